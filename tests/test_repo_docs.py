"""Documents that must not rot: the divergence table names real tests; every script variable is documented; links
between the pages resolve; the GPU table has the planner's rows; requirements' lower bounds are the versions CI
runs."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _divergence_rows() -> list[list[str]]:
    text = (REPO / "docs" / "divergences.md").read_text()
    section = text.split("# Differences from the reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].strip("| ").startswith("difference") and set(rows[1]) <= set("|- ")
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows[2:]]


def test_every_divergence_row_names_existing_tests():
    rows = _divergence_rows()
    assert len(rows) >= 10
    for difference, why, pinned in rows:
        assert difference and why, (difference, why)
        refs = re.findall(r"`([^`]+)`", pinned)
        assert refs, f"row {difference[:60]!r} names no test"
        for ref in refs:
            path, _, name = ref.partition("::")
            file = REPO / path
            assert path.startswith("tests/") and file.is_file(), f"{ref}: no such test file"
            assert re.search(rf"^def {re.escape(name)}\(", file.read_text(), re.M), f"{ref}: no such test"


def _pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_-]+)==(\S+)$", path.read_text(), re.M))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_requirement_lower_bounds_are_the_ci_tested_versions():
    """diffusers / accelerate / deepspeed: the bound is CI's pin (the suite runs with it); transformers and peft: the
    oldest release CI installs beside the pin (.ci/oldest.txt: the text encoders, and exported adapters, must load
    with it)."""
    pins, oldest = _pins(REPO / ".ci" / "constraints.txt"), _pins(REPO / ".ci" / "oldest.txt")
    bounds = dict(re.findall(r"^([A-Za-z0-9_-]+)>=(\S+)", (REPO / "requirements.txt").read_text(), re.M))
    for name in ("diffusers", "accelerate", "deepspeed", "transformers", "peft"):
        tested = oldest.get(name) or pins[name]
        bound = _version(bounds[name])
        assert bound == _version(tested)[:len(bound)], f"requirements {name}>={bounds[name]} but CI tests {tested}"


def test_gpu_table_rows_are_what_tools_gpu_table_prints():
    """docs/training.md's "Which GPUs do I need" table has tools/gpu_table.py's header and, in order, one row for each
    launch of its default grid, each with one figure per column (the figures take minutes to trace: not redone)."""
    from tools.gpu_table import HEADER, grid, row_key

    text = (REPO / "docs" / "training.md").read_text()
    section = text.split("### Which GPUs do I need", 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert tuple(lines[:2]) == HEADER
    keys = [row_key(*launch) for launch in grid()]
    assert [line[:len(key)] for line, key in zip(lines[2:], keys)] == keys and len(lines) - 2 == len(keys)
    columns = HEADER[0].count("|") - 1
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == columns and all(float(c) > 0 for c in cells[4:]), line


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_resolve():
    """Every relative link of the README and docs/ names an existing file, and its #anchor a heading there."""
    broken = []
    for page in _pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: link to {target}: no such file")
            elif anchor and anchor not in {_slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}:
                broken.append(f"{page.relative_to(REPO)}: link to {target}: no such heading")
    assert not broken, "\n".join(broken)


def test_docs_pages_named_in_the_code_exist():
    """Messages, docstrings and comments send readers to ``docs/<page>.md``; a renamed or merged page must not leave
    them pointing nowhere (``tools/gpu_check.sh`` named a page that never landed)."""
    missing = []
    for folder in ("pyramid_dit", "video_vae", "trainer_misc", "train", "tools", "scripts", "tests"):
        for file in sorted((REPO / folder).rglob("*")):
            if file.suffix in (".py", ".sh", ".sbatch") and file.is_file():
                for page in set(re.findall(r"docs/[\w-]+\.md", file.read_text(encoding="utf-8"))):
                    if not (REPO / page).is_file():
                        missing.append(f"{file.relative_to(REPO)}: {page}")
    assert not missing, "\n".join(missing)


def _script_variables() -> set[str]:
    """What the scripts' headers set (``: "${VAR:=...}"``) and what their launchers read."""
    from tools.launch import SCRIPTS
    from train.launch import SCRIPT_VARIABLES

    names = set()
    for script in (REPO / "scripts").glob("*.sh"):
        names |= set(re.findall(r'^: "\$\{([A-Z][A-Z0-9_]*):=', script.read_text(), re.M))
    for variables in SCRIPT_VARIABLES.values():
        names |= set(variables)
    for script in SCRIPTS.values():
        names |= set(script.variables)
    return names


def test_every_script_variable_is_documented():
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", (REPO / "docs" / "variables.md").read_text()))
    names = _script_variables()
    assert {"GPUS", "VIDEO_SYNC_GROUP", "KIND", "VAE_MODEL_PATH", "QUICKSTART_DIR", "TORCH_CPU_INDEX"} <= names
    missing = sorted(names - documented)
    assert not missing, f"script variables missing from docs/variables.md: {missing}"
