"""The code's shape: small modules with one job, short functions, imports that flow one way."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"train_parta", "train_partb", "evaluate", "visualize", "sweep_offline", "bench"}
# Each module may import only modules of lower layers: data -> models -> loop -> checkpoint files ->
# evaluate/visualize. data.py is also a small CLI, but every layer above uses its discovery and split.
LAYERS = {
    "startup": 0,
    "cli": 1, "presets": 1,
    "storage": 2,
    "images": 2, "sampler": 2, "devices": 2, "amp": 2, "attribution": 2, "figures": 2,
    "sweep_space": 2, "sweep_storage": 2, "config_file": 2,
    "sweep_process": 3, "sweep_engine": 3, "folder_lock": 3,
    "download": 2.5,  # between storage (its full-disk errors) and data (its download command)
    "data": 3, "decoded_cache": 3, "models": 3, "freezing": 3, "metrics": 3,
    "device_batches": 4, "checkpoint": 4, "optim": 4, "tracking": 4, "sweep_runs": 4, "input_sizes": 4,
    "flags": 5, "inference": 5, "summary": 5, "sweep_report": 5,
    "runs": 6,
    "loaders": 7,
    "features": 8, "engine": 8,
    **{s: 10 for s in SCRIPTS},
}
FLAG_LISTS = {"get_args_parser", "add_training_args"}  # argparse builders: plain lists of flags


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(REPO.glob("*.py"))}


def own_imports(tree: ast.Module, names: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & names


def test_every_module_has_a_layer_and_a_one_sentence_job():
    for name, tree in modules().items():
        assert name in LAYERS, f"{name}.py: give it a layer in tests/test_layout.py"
        doc = ast.get_docstring(tree)
        assert doc and doc.splitlines()[0].endswith((".", ":")), f"{name}.py: start with a one-line docstring"


def test_imports_flow_one_way_and_no_module_imports_a_script():
    trees = modules()
    for name, tree in trees.items():
        for dep in own_imports(tree, set(trees)) - {name}:
            assert dep not in SCRIPTS, f"{name}.py imports the script {dep}.py"
            assert LAYERS[dep] < LAYERS[name], f"{name}.py (layer {LAYERS[name]}) imports {dep}.py (layer {LAYERS[dep]})"


def test_no_module_over_450_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in REPO.glob("*.py")}
    assert max(sizes.values()) <= 450, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def function_lengths() -> dict[str, int]:
    lengths = {}
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in FLAG_LISTS:
                lengths[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_function_over_60_lines():
    long = {k: v for k, v in function_lengths().items() if v > 60}
    assert not long, long


@pytest.mark.parametrize("name", ["engine.train_one_epoch", "amp.train_step"])
def test_the_training_step_and_epoch_read_in_one_screen(name):
    assert function_lengths()[name] <= 40
