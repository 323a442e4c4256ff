"""The packages import only downwards, with no circles, and nothing outside tests/ reads tests/.

Layers, top to bottom: ``train`` / ``tools`` (side by side, neither imports the other) -> ``trainer_misc`` ->
``pyramid_dit`` -> ``video_vae``; inside ``trainer_misc`` the groups run ``loop`` / ``planning`` -> ``state`` ->
``optim`` -> ``data`` -> ``runtime`` -> ``files``. Imports are read from the source (``ast``), lazy ones inside
functions included, ``if TYPE_CHECKING:`` blocks excluded (annotations only, never executed).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "tools", "trainer_misc", "pyramid_dit", "video_vae")
# Higher number = higher layer; a module may import its own layer or lower ones only.
LAYER = {"train": 4, "tools": 4, "trainer_misc": 3, "pyramid_dit": 2, "video_vae": 1}
TRAINER_GROUPS = {"loop": 6, "planning": 6, "state": 5, "optim": 4, "data": 3, "runtime": 2, "files": 1}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports (absolute imports; we use no relative ones)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use absolute imports)"
            if node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:  # "a.b.c" -> the module it names, or the module "a.b" holding name c
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {mod: {target for name in _imports(path) if (target := resolve(name)) and target != mod}
            for mod, path in modules.items()}


def _rank(module: str) -> tuple[int, int]:
    parts = module.split(".")
    group = TRAINER_GROUPS.get(parts[1], 0) if parts[0] == "trainer_misc" and len(parts) > 1 else 0
    return LAYER[parts[0]], group


def test_no_module_imports_a_layer_above_it():
    upward = []
    for mod, targets in _graph().items():
        for target in targets:
            top, target_top = mod.split(".")[0], target.split(".")[0]
            if {top, target_top} == {"train", "tools"}:
                upward.append(f"{mod} -> {target} (train and tools are side by side)")
            elif LAYER[target_top] > LAYER[top] or (top == target_top == "trainer_misc"
                                                    and _rank(target)[1] > _rank(mod)[1]):
                upward.append(f"{mod} -> {target}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            connect(v)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The layer check is not vacuous: a model-package module importing the trainer is caught."""
    fake = tmp_path / "probe.py"
    fake.write_text("from trainer_misc.loop.trainer import train\n")
    assert _imports(fake) == {"trainer_misc.loop.trainer", "trainer_misc.loop.trainer.train"}
    graph = {"pyramid_dit.probe": {"trainer_misc.loop.trainer"}}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: graph)
    with pytest.raises(AssertionError, match="pyramid_dit.probe -> trainer_misc.loop.trainer"):
        test_no_module_imports_a_layer_above_it()


@pytest.mark.parametrize("module", ["pyramid_dit", "pyramid_dit.pipeline", "pyramid_dit.modeling_pyramid_flux",
                                    "pyramid_dit.pipeline_loading", "video_vae"])
def test_the_model_package_stands_alone(module):
    """Importing the model package (and what generation uses) loads nothing of the trainer or the tools."""
    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('trainer_misc', 'tools', 'train')); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module", ["train.args", "train.launch", "tools.launch", "tools.generate",
                                    "pyramid_dit.kinds", "trainer_misc.runtime.launcher"])
def test_argument_checks_import_no_torch(module):
    """What a launch script runs before it starts processes (and ``--help``) imports neither torch nor diffusers:
    a refused setting is answered in about a second."""
    code = (f"import sys, {module}; heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') "
            "if m in sys.modules); print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _code_strings(path: Path) -> list[str]:
    """The string constants of a module's code: docstrings excluded (they may name tests, reading them may not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_nothing_outside_tests_reads_tests():
    offenders = [f"{path.relative_to(REPO)}: {text!r}" for path in _modules().values() for text in _code_strings(path)
                 if text == "tests" or text.startswith("tests/") or "/tests/" in text]
    assert not offenders, f"production code that reads tests/: {offenders}"


def test_no_sys_path_edits_in_packages():
    offenders = [str(p.relative_to(REPO)) for p in _modules().values() if "sys.path.insert" in p.read_text()]
    assert not offenders, f"modules that edit sys.path (the packages are installed: pip install -e .): {offenders}"
