"""tools/bench.py end to end on a tiny folder: every ratio is a positive number equal to ours / reference."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import CLASSES, make_dataset, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench  # noqa: E402

RATIOS = {  # ratio: (numerator, denominator) as the JSON names them
    "data_loading_ratio": ("ours_loading", "reference_loading"),
    "data_loading_aug_ratio": ("ours_loading_aug", "reference_loading_aug"),
    "parta_train_ratio": ("ours_parta_train", "reference_parta_train"),
}


def test_bench_json_holds_every_ratio_consistent_with_its_rates(tmp_path):
    """Tiny settings (32 px, 2 batches of 8, resnet18 untrained): the JSON's rates and ratios agree."""
    root = make_dataset(tmp_path / "ds", CLASSES[:2], n_train=8, n_val=1, size=48)
    out = tmp_path / "bench.json"
    run_cli(
        "tools/bench.py",
        "--data_dir",
        root,
        "--image_size",
        "32",
        "--batches",
        "2",
        "--batch_size",
        "4",
        "--partb_batches",
        "1",
        "--partb_epochs",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--partb_model",
        "resnet18",
        "--parta_filters",
        "4",
        "--cache",
        tmp_path / "cache",
        "--json",
        out,
        check=True,
        timeout=120,
    )
    result = json.loads(out.read_text())
    for ratio, (ours, ref) in RATIOS.items():
        for key in (ratio, ours, ref):
            assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
        assert result[ratio] == result[ours] / result[ref], ratio
    pb = result["partb"]
    assert pb["model"] == "resnet18" and pb["epochs"] == 1 and pb["images"] == 4
    assert pb["uncached_s"] > 0 and pb["cached_s"] > 0
    assert result["partb_cache_ratio"] == pb["uncached_s"] / pb["cached_s"]
    assert result["train_images"] == 16 and result["image_size"] == 32


def test_a_training_step_takes_as_many_operations_at_any_batch_size():
    """The CUDA code path (batched crop, bf16 autocast, fused optimizer), counted on the CPU: the batch's
    inputs, the step and the bookkeeping take the same operations at 8 and 32 images, at most 250."""
    small, large = bench.step_operations(8), bench.step_operations(32)
    assert small == large and large["total"] <= 250, (small, large)
    assert bench.step_operations(8, ema=0.999)["step"] - small["step"] <= 3  # the EMA update: at most 3


def test_train_speed_prints_a_speed_line_per_size(tmp_path, capsys):
    """tools/train_speed.py on the CPU at tiny sizes: one SPEED line with a positive rate; bad sizes are one line."""
    import train_speed

    from inat_classifier.cli import UserError

    root = make_dataset(tmp_path / "ds", CLASSES[:2], n_train=8, n_val=1, size=48)
    args = train_speed.get_args_parser().parse_args(
        [
            "--data_dir",
            str(root),
            "--sizes",
            "parta:32",
            "--batch_size",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    result = train_speed.main(args)
    assert result["parta:32"]["images_s"] > 0 and result["parta:32"]["busy"] is None  # no profiler off CUDA
    assert "SPEED parta_32px " in capsys.readouterr().out
    with pytest.raises(UserError, match="script:pixels"):
        train_speed.parse_sizes("partc:64")
