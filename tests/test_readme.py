"""The README's recipe for one's own small data runs as written (paths moved to a temporary folder): tiny checkpoint,
demo clips, latents, text features, training, generation."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _recipe() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own small data on the tiny model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the recipe is one bash block"
    return blocks[0]


def test_the_own_data_recipe_runs_as_written(tmp_path):
    script = _recipe().replace("runs/tiny", str(tmp_path / "tiny")).replace("data/mine", str(tmp_path / "mine"))
    assert "runs/" not in script and "data/" not in script
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYRAMID_DATA_ROOT="")
    proc = subprocess.run(["sh", "-eu", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    metrics = [json.loads(line) for line in (tmp_path / "tiny" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert (tmp_path / "tiny" / "train" / "export" / "transformer" / "config.json").is_file()
    assert (tmp_path / "tiny" / "sample.mp4").stat().st_size > 1000
