"""timm backbones in Part B (--model timm:NAME), offline: small timm models, weights saved in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

import evaluate  # noqa: E402
import train_partb  # noqa: E402
import visualize  # noqa: E402
from conftest import CLASSES, make_dataset  # noqa: E402
from inat_classifier.checkpoint import load_checkpoint  # noqa: E402
from inat_classifier.freezing import list_stages  # noqa: E402
from models import (  # noqa: E402
    build_backbone,
    count_complexity,
    restore_model,  # noqa: E402
)

MODEL = "resnet10t"  # a small timm model: conv stem, layer1-4, fc


@pytest.fixture(scope="module")
def timm_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("timm") / "ds", CLASSES[:3], n_train=8, n_val=2, size=40)


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> Path:
    """A state_dict of timm's resnet10t (random init, 1000 classes), as an offline user would save it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / f"{MODEL}.pth"
    torch.save(timm.create_model(MODEL, pretrained=False).state_dict(), path)
    return path


def test_timm_backbone_gets_a_new_head_its_stages_and_its_preprocessing(timm_weights):
    backbone = build_backbone(f"timm:{MODEL}", str(timm_weights), 3)
    assert backbone.head_name == "fc" and backbone.model.get_classifier().out_features == 3
    assert backbone.weights_source == f"file:{timm_weights}" and backbone.spec == {"kind": "timm", "name": MODEL}
    state = torch.load(timm_weights, weights_only=True)
    assert torch.equal(backbone.model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert [n for n, _ in list_stages(backbone.model)][-5:] == ["layer1", "layer2", "layer3", "layer4", "fc"]
    cfg = timm.create_model(MODEL, pretrained=False).pretrained_cfg  # what timm trained it at (176 px here)
    assert backbone.image_size == cfg["input_size"][-1] and backbone.mean == pytest.approx(cfg["mean"])
    params, macs = count_complexity(backbone.model, 224)
    assert params == sum(p.numel() for p in backbone.model.parameters()) and macs > 0


def test_unknown_timm_model_and_offline_default_weights_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown timm model"):
        build_backbone("timm:no_such_net", "none", 3)


@pytest.mark.parametrize("freeze", ["upto:layer3", "last:1", "none"])
def test_timm_fine_tunes_with_every_freeze_mode_and_evaluates(timm_data, timm_weights, tmp_path, freeze):
    """Freezing, discriminative LRs, then evaluate.py and visualize gradcam from the checkpoint alone."""
    args = train_partb.get_args_parser().parse_args(
        [
            "--model",
            f"timm:{MODEL}",
            "--weights",
            str(timm_weights),
            "--freeze",
            freeze,
            "--data_dir",
            str(timm_data),
            "--out_dir",
            str(tmp_path),
            "--run_name",
            "t",
            "--image_size",
            "48",
            "--batch_size",
            "8",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--wandb",
            "disabled",
            "--device",
            "cpu",
            "--backbone_lr",
            "1e-4",
        ]
    )
    train_partb.main(args)
    ckpt = load_checkpoint(tmp_path / "t" / "last.pt")
    state, original = ckpt["model_state"], torch.load(timm_weights, weights_only=True)
    frozen = torch.equal(state["layer1.0.conv1.weight"], original["layer1.0.conv1.weight"])
    assert frozen == (freeze != "none")
    lrs = {g["name"]: g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]}
    assert lrs["head"] == pytest.approx(1e-3) and lrs["backbone"] == pytest.approx(1e-4)  # discriminative LRs
    model, _ = restore_model(tmp_path / "t" / "best.pt", torch.device("cpu"))
    assert model.get_classifier().out_features == 3
    if freeze != "upto:layer3":
        return  # evaluate.py and visualize.py once are enough
    best = str(tmp_path / "t" / "best.pt")
    metrics = evaluate.main(
        evaluate.get_args_parser().parse_args(["--ckpt", best, "--workers", "0", "--device", "cpu"])
    )
    assert metrics["n"] == 3 * 2 and 0 <= metrics["accuracy"] <= 1
    figure = visualize.main(
        visualize.get_args_parser().parse_args(["gradcam", "--ckpt", best, "--n", "2", "--device", "cpu"])
    )
    assert Path(figure).is_file() and Path(figure).stat().st_size > 0


def test_timm_head_only_uses_the_feature_cache(timm_data, timm_weights, tmp_path):
    args = train_partb.get_args_parser().parse_args(
        [
            "--model",
            f"timm:{MODEL}",
            "--weights",
            str(timm_weights),
            "--freeze",
            "all",
            "--no-augment",
            "--data_dir",
            str(timm_data),
            "--out_dir",
            str(tmp_path),
            "--run_name",
            "h",
            "--image_size",
            "48",
            "--batch_size",
            "8",
            "--epochs",
            "2",
            "--workers",
            "0",
            "--wandb",
            "disabled",
            "--device",
            "cpu",
        ]
    )
    train_partb.main(args)
    assert args.use_cache and list((tmp_path / "feature_cache").glob(f"timm-{MODEL}-train-*.pt"))
    state = load_checkpoint(tmp_path / "h" / "best.pt")["model_state"]
    assert torch.equal(
        state["layer4.0.conv1.weight"], torch.load(timm_weights, weights_only=True)["layer4.0.conv1.weight"]
    )
