"""The code's shape: user files at the root over one package, imports flowing one way, small modules with one job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "inat_classifier"
# The root holds what a user runs or edits: the scripts, and the models and data they share.
ROOT_FILES = {"train_parta", "train_partb", "evaluate", "visualize", "sweep_offline", "export", "models", "data"}
SHARED_ROOT = {"models", "data"}  # what the scripts at the root may import from beside them
FLAG_LISTS = {"get_args_parser", "add_training_args"}  # argparse builders: plain lists of flags


def python_files() -> dict[str, Path]:
    files = {p.stem: p for p in REPO.glob("*.py")}
    for p in PACKAGE.rglob("*.py"):
        if p.stem != "__init__":
            files[".".join(("inat_classifier", *p.relative_to(PACKAGE).with_suffix("").parts))] = p
    return files


def parsed() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text()) for name, path in python_files().items()}


def imported(tree: ast.Module) -> set[str]:
    """Top-level names of imported modules, with `inat_classifier.X` kept whole."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module in ("inat_classifier", "inat_classifier.sweep"):
                found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_root_holds_only_what_a_user_runs_or_edits():
    assert {p.stem for p in REPO.glob("*.py")} == ROOT_FILES


def test_the_package_never_imports_a_root_file():
    for name, tree in parsed().items():
        if name.startswith("inat_classifier."):
            bad = {m.split(".")[0] for m in imported(tree)} & ROOT_FILES
            assert not bad, f"{name} imports the root file(s) {sorted(bad)}: move what it needs down, or pass it in"


def test_scripts_use_the_package_and_the_shared_root_files_only():
    for name, tree in parsed().items():
        if name in ROOT_FILES:
            others = {m.split(".")[0] for m in imported(tree)} & ROOT_FILES - {name}
            assert others <= SHARED_ROOT, f"{name}.py imports the script(s) {sorted(others - SHARED_ROOT)}"
    shared = {
        n: {m.split(".")[0] for m in imported(t)} & ROOT_FILES - {n} for n, t in parsed().items() if n in SHARED_ROOT
    }
    assert all(not deps for deps in shared.values()), shared  # models.py and data.py build on the package only


def package_graph() -> dict[str, set[str]]:
    trees = {n: t for n, t in parsed().items() if n.startswith("inat_classifier.")}
    return {n: {m for m in imported(t) if m in trees} - {n} for n, t in trees.items()}


def test_the_package_has_no_import_cycle():
    graph, done, path = package_graph(), set(), []

    def visit(node: str) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node) :] + [node]))
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_every_module_has_a_one_sentence_job():
    for name, tree in parsed().items():
        doc = ast.get_docstring(tree)
        assert doc and doc.splitlines()[0].endswith((".", ":")), f"{name}: start with a one-line docstring"


def test_no_module_over_600_lines():
    """A generous ceiling: modules hold one job each and stay readable; functions are kept short by ruff's
    complexity rule (C901 in pyproject.toml), which .ci/run checks."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in python_files().items()}
    assert max(sizes.values()) <= 600, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def function_lengths() -> dict[str, int]:
    lengths = {}
    for name, tree in parsed().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in FLAG_LISTS:
                lengths[f"{name.split('.')[-1]}.{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


@pytest.mark.parametrize("name", ["engine.train_one_epoch", "training.train_step"])
def test_the_training_step_and_epoch_read_in_one_screen(name):
    assert function_lengths()[name] <= 40
