"""models.py: ConvNet shapes over its flags, filter widths, size checks, and count_complexity."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from models import ACTIVATIONS, ConvNet, block_widths, build_from_spec, count_complexity

ACTS = sorted(ACTIVATIONS)
GRID = list(itertools.product([0.5, 1.0, 2.0], [1, 2, 3, 4, 5], [32, 48, 64, 100]))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("filter_org, conv_layers, image_size", GRID)
def test_convnet_output_shape_over_flag_grid(filter_org, conv_layers, image_size):
    i = GRID.index((filter_org, conv_layers, image_size))
    kernel = 3 if i % 2 else [5, 3, 4, 1, 3][:conv_layers]  # int, or one per block (even and 1x1 too)
    model = ConvNet(
        num_classes=7,
        image_size=image_size,
        conv_layers=conv_layers,
        filters=8,
        filter_org=filter_org,
        kernel_size=kernel,
        activation=ACTS[i % len(ACTS)],
        batch_norm=bool(i % 3),
        dropout=0.2,
        dense_neurons=16,
        pool=("flatten", "avg")[i % 2],
    )
    out = model(torch.randn(2, 3, image_size, image_size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == block_widths(8, filter_org, conv_layers)
    expected_k = [kernel] * conv_layers if isinstance(kernel, int) else kernel
    assert [c.kernel_size[0] for c in convs] == expected_k


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("pool", ["flatten", "avg"])
def test_every_activation_batch_norm_and_pool(activation, batch_norm, pool):
    model = ConvNet(
        num_classes=4,
        image_size=32,
        conv_layers=3,
        filters=4,
        activation=activation,
        batch_norm=batch_norm,
        dense_neurons=8,
        pool=pool,
    )
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 4)
    assert any(isinstance(m, ACTIVATIONS[activation]) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == batch_norm
    # conv bias is redundant before batch norm
    assert all((c.bias is None) == batch_norm for c in model.modules() if isinstance(c, nn.Conv2d))
    # and it trains: one step reduces the loss on a fixed batch
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("filters", [1, 2, 3, 16])
def test_halving_filters_never_go_below_one(filters):
    model = ConvNet(
        num_classes=3, image_size=32, conv_layers=5, filters=filters, filter_org=0.5, batch_norm=False, dense_neurons=4
    )
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert min(widths) >= 1 and widths[0] == filters
    assert widths == sorted(widths, reverse=True)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert block_widths(16, 0.5, 5) == [16, 8, 4, 2, 1]
    assert block_widths(32, 2, 3) == [32, 64, 128]


@pytest.mark.parametrize("image_size, conv_layers", [(16, 5), (31, 5), (3, 2), (1, 1)])
def test_too_small_image_size_is_a_clear_value_error(image_size, conv_layers):
    with pytest.raises(ValueError) as e:
        ConvNet(num_classes=3, image_size=image_size, conv_layers=conv_layers)
    msg = str(e.value)
    assert f"image_size {image_size} is too small" in msg and f"at least {2**conv_layers}" in msg


def test_smallest_allowed_image_size_works():
    model = ConvNet(num_classes=3, image_size=32, conv_layers=5, filters=4, dense_neurons=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(activation="tanhh"), "unknown activation"),
        (dict(conv_layers=0), "conv_layers"),
        (dict(filters=0), "filters"),
        (dict(filter_org=0.0), "filter_org"),
        (dict(dropout=1.0), "dropout"),
        (dict(pool="max"), "pool"),
        (dict(conv_layers=3, kernel_size=[3, 3]), "kernel_size lists 2 sizes"),
        (dict(conv_layers=2, kernel_size=[3, 0]), "kernel sizes must be >= 1"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ConvNet(num_classes=3, image_size=64, **kwargs)


# Parameter counts worked out by hand from the layer shapes (weights + biases + batch-norm affine).
HAND_COUNTS = [
    # 64 px, widths 8-16-32-64-128, 3x3, no conv bias (batch norm: 2 per channel), 64/2**5 = 2 -> 128*2*2 = 512
    (
        dict(conv_layers=5, filters=8, filter_org=2.0, batch_norm=True, pool="flatten"),
        (3 * 8 + 8 * 16 + 16 * 32 + 32 * 64 + 64 * 128) * 9
        + 2 * (8 + 16 + 32 + 64 + 128)
        + (512 * 32 + 32)
        + (32 * 10 + 10),
    ),
    # widths 6-3-2 (6 * 0.25 = 1.5 rounds to 2), kernels 7-5-3 with bias; avg pool -> 2 features
    (
        dict(conv_layers=3, filters=6, filter_org=0.5, kernel_size=[7, 5, 3], batch_norm=False, pool="avg"),
        (3 * 6 * 49 + 6) + (6 * 3 * 25 + 3) + (3 * 2 * 9 + 2) + (2 * 32 + 32) + (32 * 10 + 10),
    ),
]


@pytest.mark.parametrize("kwargs, expected", HAND_COUNTS)
def test_count_complexity_params_equal_a_count_from_the_layer_shapes(kwargs, expected):
    """count_complexity's parameters equal the hand count from the layer shapes (115378 and 1823)."""
    assert expected in (115378, 1823)
    model = ConvNet(num_classes=10, image_size=64, dense_neurons=32, **kwargs)
    params, macs = count_complexity(model, 64)
    assert params == expected
    assert macs > 0


def test_count_complexity_params_equal_torchvisions_published_count():
    """resnet18 (1000 classes) has torchvision's published num_params; with a 4-class head 1000*513 fewer + 4*513."""
    from torchvision.models import ResNet18_Weights, get_model

    import models

    published = ResNet18_Weights.IMAGENET1K_V1.meta["num_params"]
    assert published == 11689512
    params, _ = count_complexity(get_model("resnet18", weights=None), 32)
    assert params == published
    backbone = models.build_backbone("resnet18", "none", 4)
    assert count_complexity(backbone.model, 32)[0] == published - 1000 * 513 + 4 * 513


def test_count_complexity_one_layer_by_hand():
    # conv 3->4, 3x3 'same' on 8x8; pool -> 4x4x4 = 64; dense 64->5; head 5->3
    model = ConvNet(
        num_classes=3,
        image_size=8,
        conv_layers=1,
        filters=4,
        kernel_size=3,
        batch_norm=False,
        dense_neurons=5,
        pool="flatten",
        activation="relu",
    )
    params, macs = count_complexity(model, 8)
    conv_macs = (4 * 8 * 8) * (3 * 3 * 3)
    dense_macs = 64 * 5 + 5 * 3
    assert macs == conv_macs + dense_macs == 7247
    assert params == (4 * 3 * 3 * 3 + 4) + (64 * 5 + 5) + (5 * 3 + 3) == 455


def test_count_complexity_two_layers_by_hand():
    # block 1: conv 3->4, 5x5 on 16x16 (no bias: batch norm), pool -> 8x8
    # block 2: conv 4->8, 3x3 on 8x8, pool -> 4x4; avg pool -> 8; dense 8->6; head 6->2
    model = ConvNet(
        num_classes=2,
        image_size=16,
        conv_layers=2,
        filters=4,
        filter_org=2.0,
        kernel_size=[5, 3],
        batch_norm=True,
        dense_neurons=6,
        pool="avg",
    )
    params, macs = count_complexity(model, 16)
    expected_macs = (4 * 16 * 16) * (5 * 5 * 3) + (8 * 8 * 8) * (3 * 3 * 4) + 8 * 6 + 6 * 2
    assert macs == expected_macs
    expected_params = (4 * 5 * 5 * 3 + 2 * 4) + (8 * 3 * 3 * 4 + 2 * 8) + (8 * 6 + 6) + (6 * 2 + 2)
    assert params == expected_params
    # counting neither changes the mode nor leaves hooks behind
    model.train()
    count_complexity(model, 16)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_build_from_spec_rebuilds_the_same_architecture():
    kwargs = dict(
        conv_layers=2,
        filters=4,
        filter_org=2.0,
        kernel_size=[5, 3],
        activation="silu",
        batch_norm=True,
        dropout=0.1,
        dense_neurons=8,
        pool="avg",
        image_size=32,
    )
    a = ConvNet(num_classes=5, **kwargs)
    b = build_from_spec({"kind": "convnet", "kwargs": kwargs}, 5)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="unknown model kind"):
        build_from_spec({"kind": "transformer", "kwargs": {}}, 5)


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "vit_b_16",
        "swin_t",
        "maxvit_t",
        "convnext_tiny",
        "efficientnet_b0",
        "mobilenet_v3_small",
        "regnet_y_400mf",
        "googlenet",
        "inception_v3",
    ],
)
def test_complexity_matches_torchvisions_published_counts(name):
    """count_complexity within 1 % of the weights' own num_params and GFLOPs (attention and matmuls count:
    vit_b_16 is 17.56 GMACs, swin_t 4.49, not the 11.3 / 2.96 of counting only conv and linear layers)."""
    from models import published_complexity

    model, size, params_published, gmacs_published = published_complexity(name)
    params, macs = count_complexity(model, size)
    assert params == pytest.approx(params_published, rel=0.01)
    assert macs / 1e9 == pytest.approx(gmacs_published, rel=0.01)


def test_summary_flag_prints_every_layer_from_a_traced_pass_without_a_dataset(tmp_path):
    """train_parta.py --summary: one row per leaf layer with output shape, parameters and MACs, totals
    that add up, and no dataset needed (run from an empty folder)."""
    import subprocess
    import sys

    from conftest import REPO, clean_env

    cmd = [
        sys.executable,
        str(REPO / "train_parta.py"),
        "--summary",
        "--image_size",
        "64",
        "--filters",
        "8",
        "--conv_layers",
        "2",
        "--dense_neurons",
        "16",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["layer", "type", "output", "params", "MACs"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:-1]}
    conv = next(r for name, r in rows.items() if r[1] == "Conv2d")
    assert conv[2] == "1x8x64x64"  # first block, same padding: the traced output shape
    model = ConvNet(
        num_classes=10,
        image_size=64,
        conv_layers=2,
        filters=8,
        filter_org=1.5,
        kernel_size=3,
        activation="gelu",
        batch_norm=True,
        dropout=0.1,
        dense_neurons=16,
        pool="avg",
    )
    assert sum(int(r[3].replace(",", "")) for r in rows.values()) == sum(p.numel() for p in model.parameters())
    assert lines[-1].startswith(f"total: {sum(p.numel() for p in model.parameters()):,} parameters")
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder


def test_partb_summary_marks_frozen_layers(tmp_path):
    import train_partb
    from inat_classifier.model_info import layer_table

    args = train_partb.get_args_parser().parse_args(
        ["--model", "resnet18", "--weights", "none", "--freeze", "upto:layer3", "--summary"]
    )
    train_partb.resolve_recipe(args)
    backbone = train_partb.build_backbone_for(args, 10)
    table, macs = layer_table(backbone.model, 64)
    rows = {r["layer"]: r for r in table}
    assert macs == count_complexity(backbone.model, 64)[1]
    assert rows["layer1.0.conv1"]["trainable"] is False and rows["layer4.0.conv1"]["trainable"] is True
    assert rows["fc"]["trainable"] is True and rows["fc"]["output"] == "1x10"
    assert rows["layer4.0.conv1"]["macs"] == 2 * 2 * 512 * 256 * 9  # 2x2 output at 64 px, 3x3 conv 256->512


def test_summary_total_counts_attention_inside_non_leaf_modules():
    """vit_b_16's attention matmuls run in MultiheadAttention (not a leaf): the table's total still has them."""
    from torchvision.models import vit_b_16

    from inat_classifier.model_info import layer_table

    _, macs = layer_table(vit_b_16(), 224)
    assert macs / 1e9 == pytest.approx(17.564, rel=0.01)  # torchvision's published figure
