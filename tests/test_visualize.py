"""visualize.py, attribution.py, figures.py: every figure from a real (tiny) checkpoint, the prediction
grid's frames, guided backpropagation (rule, hooks, copies), Grad-CAM on torchvision models, errors,
W&B opt-in and the one-way imports."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import models
import train_parta
import visualize
from conftest import assert_one_line_error, make_dataset, run_cli, train_args
from inat_classifier import attribution, checkpoint, cli, figures, inference, tracking
from inat_classifier.images import load_image
from inat_classifier.presets import Preprocess
from models import ACTIVATIONS, ConvNet

CLASSES3 = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def viz_run(tmp_path_factory):
    """A tiny Part A checkpoint (1 epoch, 32 px, 2 blocks of 4 filters) on 3 colour classes."""
    root = make_dataset(tmp_path_factory.mktemp("vizdata") / "ds", CLASSES3, n_train=12, n_val=4, size=32)
    out = tmp_path_factory.mktemp("vizruns")
    args = train_parta.get_args_parser().parse_args(train_args(root, out, "viz", 1, "--filters", "4", "--seed", "0"))
    train_parta.main(args)
    return types.SimpleNamespace(root=root, run_dir=out / "viz", ckpt=out / "viz" / "best.pt")


def viz(*argv) -> Path:
    return visualize.main(visualize.get_args_parser().parse_args([str(a) for a in argv]))


def assert_png(path: Path, min_side: int = 150, max_side: int = 6000) -> tuple[int, int]:
    assert path.is_file(), path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
    assert min_side <= w <= max_side and min_side <= h <= max_side, (w, h)
    return w, h


def hooks_left(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def input_grad(model: nn.Module, x: torch.Tensor, cls: int = 0) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x)[:, cls].sum(), x)
    return g


# ----------------------------------------------------------------------------- CLI surface
def test_parser_every_flag_has_help_and_needs_a_command():
    parser = visualize.get_args_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    assert set(sub.choices) == set(visualize.COMMANDS)
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.dest)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    a = parser.parse_args(["predictions", "--ckpt", "x.pt"])
    assert (a.rows, a.cols, a.per_class, a.seed, a.wandb, a.out) == (10, 3, False, 0, False, None)


@pytest.mark.parametrize(
    "argv",
    [
        ["filters"],
        ["predictions", "--per_class"],
        ["feature_maps"],
        ["guided_backprop", "--n", "2"],
        ["gradcam", "--n", "3"],
        ["confusion", "--workers", "0"],
    ],
)
def test_each_subcommand_writes_a_png_into_the_checkpoint_folder(viz_run, argv, capsys):
    out = viz(*argv, "--ckpt", viz_run.ckpt, "--device", "cpu")
    assert out.parent == viz_run.run_dir
    assert f"wrote {out}" in capsys.readouterr().out
    assert_png(out)


def test_predictions_grid_out_folder_and_image_files(viz_run, tmp_path):
    out = viz("predictions", "--ckpt", viz_run.run_dir, "--rows", "2", "--cols", "3", "--out", tmp_path / "figs")
    assert out == tmp_path / "figs" / "predictions.png"
    assert_png(out)
    img = sorted((viz_run.root / "val" / "red").iterdir())[0]
    for cmd in ("feature_maps", "gradcam", "guided_backprop"):
        p = viz(cmd, "--ckpt", viz_run.ckpt, "--image", img, "--out", tmp_path)
        assert_png(p)
    p = viz(
        "guided_backprop",
        "--ckpt",
        viz_run.ckpt,
        "--image",
        img,
        "--neuron",
        "features.1.2:0-1",
        "0",
        "--out",
        tmp_path,
    )
    assert_png(p)
    p = viz("filters", "--ckpt", viz_run.ckpt, "--layer", "features.1", "--out", tmp_path)
    assert p.name == "filters_features_1_0.png"
    assert_png(p, min_side=100)


def test_curves_one_and_several_runs(viz_run, tmp_path):
    assert_png(viz("curves", "--run", viz_run.run_dir, "--out", tmp_path))
    runs = []
    for lr in ("lr1e-03", "lr5e-03"):
        d = tmp_path / f"parta-f4-{lr}-20260101"
        d.mkdir()
        shutil.copy(viz_run.run_dir / "metrics.csv", d / "metrics.csv")
        runs.append(d)
    out = viz("curves", "--run", *runs)
    assert out == tmp_path / "curves_compare.png"
    assert_png(out)
    assert tracking.short_labels([r.name for r in runs]) == ["lr1e-03", "lr5e-03"]


# ----------------------------------------------------------------------------- prediction grid
def test_prediction_grid_frames_exactly_the_wrong_predictions(viz_run, tmp_path):
    model, ckpt = models.restore_model(viz_run.ckpt, torch.device("cpu"))
    samples, _ = inference.heldout_samples(ckpt, str(viz_run.root), "test")
    chosen = visualize.choose_samples(samples, 9, seed=3)
    assert chosen == visualize.choose_samples(samples, 9, seed=3) != visualize.choose_samples(samples, 9, seed=4)
    records = visualize.prediction_samples(model, ckpt, chosen, torch.device("cpu"))
    # The model's own outputs, computed here independently.
    preprocess = Preprocess.from_dict(ckpt["preprocess"])
    x = torch.stack([inference.load_input(p, preprocess) for p, _ in chosen])  # the one eval pipeline
    with torch.no_grad():
        probs = model(x).softmax(1)
    assert [r["path"] for r in records] == [p for p, _ in chosen]
    for r, (path, label), p in zip(records, chosen, probs, strict=True):
        assert r["true"] == label
        assert r["pred"] == int(p.argmax())
        assert r["confidence"] == pytest.approx(float(p.max()), abs=1e-5)
        assert r["correct"] == (int(p.argmax()) == label)
        assert torch.allclose(r["image"], inference.load_input(path, preprocess))
    names = ckpt["class_names"]
    colours = figures.plot_prediction_grid(records, names, preprocess, tmp_path / "grid.png", cols=3, title="t")
    assert colours == [
        figures.WRONG if int(p.argmax()) != y else figures.RIGHT for p, (_, y) in zip(probs, chosen, strict=True)
    ]
    assert_png(tmp_path / "grid.png")
    # A grid with both kinds for sure: the same images with every other true label moved on by one.
    relabelled = [(p, (y + i % 2) % 3) for i, (p, y) in enumerate(chosen)]
    records2 = visualize.prediction_samples(model, ckpt, relabelled, torch.device("cpu"))
    expected = [
        figures.WRONG if int(p.argmax()) != y else figures.RIGHT for p, (_, y) in zip(probs, relabelled, strict=True)
    ]
    assert figures.RIGHT in expected and figures.WRONG in expected
    assert (
        figures.plot_prediction_grid(records2, names, preprocess, tmp_path / "grid2.png", cols=3, title="t") == expected
    )
    # Shown un-normalised, in true colours: the panel's mean colour is the file's.
    for r in records:
        rgb = figures.unnormalize(r["image"], preprocess.mean, preprocess.std)
        ref = torch.from_numpy(np.array(load_image(r["path"]))).float() / 255
        assert rgb.shape == (32, 32, 3) and 0 <= rgb.min() and rgb.max() <= 1
        assert torch.allclose(rgb.mean((0, 1)), ref.mean((0, 1)), atol=0.03)


def test_prediction_samples_skip_unreadable_files(viz_run, tmp_path, capsys):
    model, ckpt = models.restore_model(viz_run.ckpt, torch.device("cpu"))
    samples, _ = inference.heldout_samples(ckpt, str(viz_run.root), "test")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    chosen = [samples[0], (str(bad), 1), samples[-1]]
    records = visualize.prediction_samples(model, ckpt, chosen, torch.device("cpu"))
    assert [r["path"] for r in records] == [samples[0][0], samples[-1][0]]
    assert [r["true"] for r in records] == [samples[0][1], samples[-1][1]]
    assert str(bad) in capsys.readouterr().err
    assert visualize.prediction_samples(model, ckpt, [(str(bad), 0)], torch.device("cpu")) == []


def test_per_class_shows_every_class(viz_run):
    model, ckpt = models.restore_model(viz_run.ckpt, torch.device("cpu"))
    samples, _ = inference.heldout_samples(ckpt, str(viz_run.root), "test")
    chosen = visualize.choose_samples(samples, 0, seed=0, per_class=3, num_classes=3)
    assert [y for _, y in chosen] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


# ----------------------------------------------------------------------------- guided backprop
def reference_guided_relu(model: nn.Module, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """The textbook ReLU guided backprop: clamp the grad_input of every ReLU at 0 (full backward hooks)."""
    hooks = [
        m.register_full_backward_hook(lambda m, gi, go: (gi[0].clamp(min=0),))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    try:
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(x).gather(1, cls.view(-1, 1)).sum(), x)
    finally:
        for h in hooks:
            h.remove()
    return g


def test_guided_backprop_equals_the_textbook_rule_for_relu():
    torch.manual_seed(0)
    model = ConvNet(3, image_size=32, conv_layers=2, filters=4, activation="relu", dense_neurons=16).eval()
    x = torch.randn(2, 3, 32, 32)
    g, logits = attribution.guided_backprop(model, x)
    ref = reference_guided_relu(model, x, logits.argmax(1))
    assert torch.allclose(g, ref, atol=1e-6)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_guided_backprop_every_activation_shape_nonzero_differs_and_leaves_model_alone(activation):
    torch.manual_seed(1)
    model = ConvNet(3, image_size=32, conv_layers=2, filters=4, activation=activation, dense_neurons=16).eval()
    x = torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = input_grad(model, x)
    g, logits = attribution.guided_backprop(model, x)
    plain, _ = attribution.guided_backprop(model, x, guided=False)
    assert g.shape == x.shape
    assert g.abs().sum() > 0
    assert not torch.allclose(g, plain, atol=1e-7)  # negative paths are cut
    target = logits.argmax(1)
    xx = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model(xx).gather(1, target.view(-1, 1)).sum(), xx)
    assert torch.allclose(plain, ref, atol=1e-6)  # guided=False: the real gradient of the predicted logits
    # Hooks gone, model untouched: ordinary gradients and weights are identical, no .grad written.
    assert torch.equal(before, input_grad(model, x))
    assert hooks_left(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not model.training


def test_guided_rule_for_non_relu_cuts_negative_inputs_and_gradients():
    """One activation by hand: grad_in = 1[x > 0] * max(phi'(x) * grad_out, 0)."""
    for act in (nn.ELU(), nn.LeakyReLU(0.1), nn.GELU(), nn.SiLU(), nn.Mish()):
        x = torch.tensor([[-2.0, -0.5, 0.5, 2.0, 1.0, -1.0]], requires_grad=True)
        gout = torch.tensor([[1.0, 1.0, 1.0, 1.0, -1.0, -1.0]])
        with torch.enable_grad():
            y = attribution._guided_hook(act, (x,), act(x))
            (g,) = torch.autograd.grad(y, x, gout)
            xx = x.detach().requires_grad_(True)
            (local,) = torch.autograd.grad(act(xx), xx, torch.ones_like(xx))
        expected = (x.detach() > 0) * (local * gout).clamp(min=0)
        assert torch.allclose(g, expected), act
        assert g[0, :2].eq(0).all() and g[0, 2:4].gt(0).all() and g[0, 4:].eq(0).all()


def test_neuron_guided_backprop_and_bad_neuron(viz_run):
    model, ckpt = models.restore_model(viz_run.ckpt, torch.device("cpu"))
    x = torch.randn(1, 3, 32, 32)
    layer = attribution.auto_cam_layer(model, x)
    assert layer == "features.1.2"  # the last block's activation, before its max-pool
    g, _ = attribution.guided_backprop(model, x, neuron=(layer, 1), reduce="sum")
    assert g.shape == x.shape
    with pytest.raises(cli.UserError, match="out of range"):
        attribution.guided_backprop(model, x, neuron=(layer, 99))
    with pytest.raises(cli.UserError, match="no module named"):
        attribution.guided_backprop(model, x, neuron=("nope", 0))
    assert attribution.parse_neurons(["features.1:0-2", "3"]) == [
        ("features.1", 0),
        ("features.1", 1),
        ("features.1", 2),
        (None, 3),
    ]
    assert hooks_left(model) == 0


# ----------------------------------------------------------------------------- torchvision
def test_gradcam_and_guided_backprop_on_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    before = input_grad(model, x)
    cams, logits, layer = attribution.grad_cam(model, x)
    assert layer == "layer4.1"
    assert cams.shape == (2, 64, 64) and cams.min() >= 0 and cams.max() <= 1
    cams3, _, layer3 = attribution.grad_cam(model, x, target=[0, 1], layer="layer3")
    assert layer3 == "layer3" and cams3.shape == (2, 64, 64) and cams3.amax((1, 2)).gt(0.99).all()
    g, _ = attribution.guided_backprop(model, x)  # ReLU(inplace=True), reused within each block
    assert g.shape == x.shape and g.abs().sum() > 0
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert hooks_left(model) == 0 and all(p.grad is None for p in model.parameters())
    assert torch.equal(before, input_grad(model, x))
    assert attribution.conv_stages(model) == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert attribution.conv_layer(model)[0] == "conv1"


def test_gradcam_matches_a_direct_computation_on_convnet():
    torch.manual_seed(2)
    model = ConvNet(3, image_size=32, conv_layers=2, filters=4, activation="relu", dense_neurons=16).eval()
    x = torch.randn(1, 3, 32, 32)
    cams, logits, layer = attribution.grad_cam(model, x, target=[2], layer="features.1")
    act = model.features(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.classifier(model.pool(act))[0, 2], act)
    cam = torch.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True)).detach()
    cam = nn.functional.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(cams, cam / cam.max(), atol=1e-5)


# ----------------------------------------------------------------------------- errors, W&B
@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["filters", "--ckpt", "{tmp}/missing.pt"], "checkpoint not found"),
        (["filters", "--ckpt", "{ckpt}", "--layer", "nope"], "no module named 'nope'"),
        (["gradcam", "--ckpt", "{ckpt}", "--image", "{tmp}/missing.jpg"], "no such file"),
        (["guided_backprop", "--ckpt", "{ckpt}", "--n", "1", "--neuron", "features.1:x"], "--neuron expects"),
        (["predictions", "--ckpt", "{ckpt}", "--rows", "0"], "--rows and --cols"),
        (["curves", "--run", "{tmp}"], "no metrics.csv"),
    ],
)
def test_bad_input_is_one_error_line(viz_run, tmp_path, capsys, argv, fragment):
    argv = [a.format(tmp=tmp_path, ckpt=viz_run.ckpt) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.run_cli(visualize.main, visualize.get_args_parser(), argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("error: ") and fragment in err, err
    assert "\n" not in err


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    proc = run_cli("visualize.py", "gradcam", "--ckpt", tmp_path / "nope.pt")
    assert_one_line_error(proc, "checkpoint not found")


def test_wandb_is_opt_in_and_never_imported_unasked(viz_run, tmp_path, capsys, monkeypatch):
    had_wandb = "wandb" in sys.modules
    viz("filters", "--ckpt", viz_run.ckpt, "--out", tmp_path)
    if not had_wandb:
        assert "wandb" not in sys.modules
    # The run trained with --wandb disabled: --wandb logs nothing and says why.
    viz("filters", "--ckpt", viz_run.ckpt, "--out", tmp_path, "--wandb")
    assert "not logging" in capsys.readouterr().out
    if not had_wandb:
        assert "wandb" not in sys.modules
    # A run that used W&B (offline, no key): the figure is logged offline into --out.
    calls = {}
    fake = types.ModuleType("wandb")

    class Run:
        summary = {}

        def log(self, d, step=None):
            calls["log"] = d

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    fake.init = init
    fake.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key: auto means offline
    png = tmp_path / "filters.png"
    png.write_bytes(b"x")
    assert tracking.log_figure("filters", png, {"wandb": "auto", "wandb_project": "p"}, tmp_path)
    assert calls["init"]["mode"] == "offline" and calls["init"]["dir"] == str(tmp_path)
    assert calls["log"] == {"filters": ("image", str(png))} and calls["finished"]


def test_every_figure_from_a_part_b_torchvision_checkpoint(viz_run, tmp_path):
    """A resnet18 checkpoint as Part B writes it (spec kind 'torchvision'), restored by models.restore_model."""
    import models

    if not hasattr(models, "build_backbone"):
        pytest.skip("Part B backbones are not in models.py")
    torch.manual_seed(0)
    backbone = models.build_backbone("resnet18", "none", 3)
    ckpt = {
        "format": checkpoint.CHECKPOINT_FORMAT,
        "spec": backbone.spec,
        "class_names": CLASSES3,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "image_size": 64,
        "epoch": 1,
        "config": {"data_dir": str(viz_run.root), "wandb": "disabled"},
        "model_state": backbone.model.state_dict(),
    }
    path = tmp_path / "run" / "best.pt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    for argv in (
        ["filters"],
        ["feature_maps"],
        ["gradcam", "--n", "2"],
        ["guided_backprop", "--n", "1", "--neuron", "0"],
        ["predictions", "--rows", "2"],
    ):
        out = viz(*argv, "--ckpt", path)
        assert out.parent == path.parent
        assert_png(out)
    model, _ = models.restore_model(path, torch.device("cpu"))
    assert attribution.auto_cam_layer(model, torch.randn(1, 3, 64, 64)) == "layer4.1"


# ----------------------------------------------------------------------------- figure content
def colour_blobs(png: Path, hex_colour: str, min_pixels: int) -> list[tuple[float, float]]:
    """Centroids (x, y) of the connected regions of exactly this colour with at least min_pixels pixels."""
    from scipy import ndimage

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    target = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    mask = np.abs(rgb - target).max(-1) <= 2
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    keep = [i + 1 for i, s in enumerate(sizes) if s >= min_pixels]
    return [(c[1], c[0]) for c in ndimage.center_of_mass(mask, labels, keep)]


def test_prediction_grid_png_draws_one_frame_per_panel_in_its_colour(viz_run, tmp_path):
    """The PNG holds as many green and red frames (rings of >= 300 px) as the returned colours say."""
    model, ckpt = models.restore_model(viz_run.ckpt, torch.device("cpu"))
    samples, _ = inference.heldout_samples(ckpt, str(viz_run.root), "test")
    chosen = visualize.choose_samples(samples, 6, seed=3)
    relabelled = [(p, (y + (i % 3 == 0)) % 3) for i, (p, y) in enumerate(chosen)]  # some wrong for sure
    records = visualize.prediction_samples(model, ckpt, relabelled, torch.device("cpu"))
    out = tmp_path / "grid.png"
    colours = figures.plot_prediction_grid(
        records, ckpt["class_names"], Preprocess.from_dict(ckpt["preprocess"]), out, cols=3, title="t"
    )
    n_right, n_wrong = colours.count(figures.RIGHT), colours.count(figures.WRONG)
    assert n_right and n_wrong and n_right + n_wrong == 6
    assert len(colour_blobs(out, figures.RIGHT, 300)) == n_right
    assert len(colour_blobs(out, figures.WRONG, 300)) == n_wrong


def constant_head_checkpoint(viz_run, dest: Path, cls: int) -> Path:
    """viz_run's checkpoint with a head that predicts class `cls` for every image."""
    ck = torch.load(viz_run.ckpt, map_location="cpu", weights_only=True)
    w, b = [k for k in ck["model_state"] if k.startswith("classifier.")][-2:]
    ck["model_state"][w] = torch.zeros_like(ck["model_state"][w])
    ck["model_state"][b] = torch.nn.functional.one_hot(torch.tensor(cls), 3).float() * 10
    dest.mkdir(parents=True)
    torch.save(ck, dest / "best.pt")
    return dest / "best.pt"


def test_confusion_png_shows_the_predicted_column(viz_run, tmp_path):
    """Heads that always predict class 0 or class 2: the dark (fraction 1.0) cells form one column three cells
    tall and one wide, at the left or at the right of the matrix."""
    from matplotlib import colormaps
    from scipy import ndimage

    dark = np.array([round(255 * c) for c in colormaps["Blues"](1.0)[:3]])
    boxes = {}
    for cls in (0, 2):
        ckpt = constant_head_checkpoint(viz_run, tmp_path / f"c{cls}", cls)
        out = viz("confusion", "--ckpt", ckpt, "--workers", "0", "--device", "cpu")
        rgb = np.asarray(Image.open(out).convert("RGB")).astype(int)
        labels, n = ndimage.label(np.abs(rgb - dark).max(-1) <= 2)
        biggest = 1 + int(np.argmax(ndimage.sum(labels > 0, labels, range(1, n + 1))))
        ys, xs = np.nonzero(labels == biggest)
        boxes[cls] = (xs.min(), xs.max(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        height, width = boxes[cls][2:]
        assert 2.5 < height / width < 3.5, boxes[cls]
    assert boxes[2][0] - boxes[0][1] > boxes[0][3]  # class 2's column is a whole cell right of class 0's


def test_filters_png_shows_the_filters_colours(viz_run, tmp_path):
    """First-layer filters set to pure red (R weights 1, G and B 0) draw red panels; pure blue ones blue."""
    counts = {}
    for name, channel in (("red", 0), ("blue", 2)):
        ck = torch.load(viz_run.ckpt, map_location="cpu", weights_only=True)
        key = next(k for k in ck["model_state"] if k.endswith("weight") and ck["model_state"][k].dim() == 4)
        w = torch.zeros_like(ck["model_state"][key])
        w[:, channel] = 1.0
        ck["model_state"][key] = w
        (tmp_path / name).mkdir()
        torch.save(ck, tmp_path / name / "best.pt")
        out = viz("filters", "--ckpt", tmp_path / name / "best.pt")
        counts[name] = (len(colour_blobs(out, "#ff0000", 50)), len(colour_blobs(out, "#0000ff", 50)))
    n = w.shape[0]
    assert counts == {"red": (n, 0), "blue": (0, n)}
