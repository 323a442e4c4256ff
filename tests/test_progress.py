"""Progress reporting (pyramid_dit/progress.py) used by training, extraction and generation: a redrawn bar on a
terminal, whole lines in a piped log (a redrawn bar there is one line that shows nothing until the job ends)."""
from __future__ import annotations

import io

from pyramid_dit.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_piped_log_gets_whole_lines_with_counts_and_rates():
    out = io.StringIO()
    for _ in progress(range(5), desc="latents rank 0", unit="clip", file=out, every_s=0):
        pass
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[-1].startswith("latents rank 0: 5/5 clip")
    assert [line.split(":")[1].split("/")[0].strip() for line in lines[:5]] == ["1", "2", "3", "4", "5"]


def test_a_piped_log_is_not_flooded():
    out = io.StringIO()
    bar = progress(total=1000, desc="train", unit="step", file=out)  # a line at most every 30 s, and one at the end
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix(loss="0.1")
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert "1000/1000 step" in out.getvalue() and "loss=0.1" in out.getvalue()


def test_a_terminal_gets_tqdm_and_disable_prints_nothing():
    from tqdm import tqdm

    assert isinstance(progress(range(3), file=_Terminal()), tqdm)
    quiet = io.StringIO()
    for _ in progress(range(3), file=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""
