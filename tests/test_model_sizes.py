"""Models at input sizes they cannot take: one line naming the sizes they take, before any run folder exists."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_one_line_error, make_dataset, run_cli, train_args
from inat_classifier.cli import UserError
from inat_classifier.model_info import check_input_size
from models import ConvNet, build_backbone


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sizes") / "ds", n_train=2, n_val=1)


def partb(data, out_dir, *extra):
    return [
        "--data_dir",
        data,
        "--out_dir",
        out_dir,
        "--weights",
        "none",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--wandb",
        "disabled",
        "--cache",
        "off",
        *extra,
    ]


@pytest.mark.parametrize(
    "model, size, says",
    [
        ("vit_b_16", 32, "vit_b_16 takes exactly 224 px"),
        ("inception_v3", 32, "inception_v3 needs at least 75 px"),
    ],
)
def test_partb_refuses_a_size_the_model_cannot_take_before_its_run_folder(data, tmp_path, model, size, says):
    out = tmp_path / "runs"
    proc = run_cli("train_partb.py", *partb(data, out, "--model", model, "--image_size", size))
    assert_one_line_error(proc, says)
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_partb_summary_refuses_it_too(data, tmp_path):
    proc = run_cli(
        "train_partb.py", *partb(data, tmp_path / "runs", "--model", "vit_b_16", "--image_size", "64", "--summary")
    )
    assert_one_line_error(proc, "vit_b_16 takes exactly 224 px")


def test_parta_refuses_an_image_too_small_for_its_pooling_before_its_run_folder(data, tmp_path):
    out = tmp_path / "runs"
    args = train_args(data, out, "small", 1)
    args[args.index("--image_size") + 1] = "16"
    args[args.index("--conv_layers") + 1] = "5"
    assert_one_line_error(run_cli("train_parta.py", *args), "at least 32")
    assert not (out / "small").exists()


# The families train_partb.py offers: exact-size transformers, convnets with a smallest size, any size.
@pytest.mark.parametrize(
    "model, size, says",
    [
        ("vit_b_32", 160, "vit_b_32 takes exactly 224 px"),
        ("maxvit_t", 64, "maxvit_t"),
        ("alexnet", 32, "alexnet needs at least 63 px"),
        ("googlenet", 8, "googlenet needs at least"),
        ("squeezenet1_1", 16, "squeezenet1_1 needs at least"),
        ("convnext_tiny", 16, "convnext_tiny needs at least 32 px"),
        ("timm:vit_tiny_patch16_224", 32, "timm:vit_tiny_patch16_224 takes exactly 224 px"),
    ],
)
def test_each_family_names_the_sizes_it_takes(model, size, says):
    torch.manual_seed(0)
    backbone = build_backbone(model, "none", 4)
    with pytest.raises(UserError, match=says):
        check_input_size(backbone.model, model, size, backbone.image_size)
    check_input_size(backbone.model, model, backbone.image_size, backbone.image_size)  # its own size passes


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v3_small", "efficientnet_lite0", "timm:resnet18"])
def test_models_that_take_any_size_pass_small_ones(model):
    backbone = build_backbone(model, "none", 4)
    check_input_size(backbone.model, model, 32, backbone.image_size)


def test_the_check_leaves_the_weights_and_mode_as_they_were():
    model = ConvNet(4, image_size=32, conv_layers=2, filters=4, dense_neurons=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_input_size(model, "ConvNet", 32, 32)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_vit_is_built_at_the_size_its_weights_were_trained_at(monkeypatch):
    """vit_b_16's SWAG weights are 384 px (vit_h_14's DEFAULT 518): the model, its input size and the
    spec a checkpoint rebuilds it from follow the weights, so they load."""
    from torchvision.models import ViT_B_16_Weights, get_model

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in get_model("vit_b_16", image_size=384).state_dict().items()}
    trained = {k: torch.zeros(shape) for k, shape in shapes.items()}  # what the download would give
    trained["encoder.pos_embedding"] = torch.randn(shapes["encoder.pos_embedding"])
    monkeypatch.setattr(ViT_B_16_Weights, "get_state_dict", lambda self, *a, **k: trained)
    backbone = build_backbone("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", 3)
    assert backbone.image_size == 384 and backbone.spec["kwargs"] == {"image_size": 384}
    assert torch.equal(backbone.model.encoder.pos_embedding, trained["encoder.pos_embedding"])
