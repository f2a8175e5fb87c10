"""The figures a user hands on read well: no panels that show nothing without saying why, a prediction
grid that fits a page, one file name for the confusion matrix whichever script draws it."""

from __future__ import annotations

import types

import pytest
import torch
from PIL import Image
from test_visualize import colour_blobs

import evaluate
import train_parta
import visualize
from conftest import make_dataset, train_args
from inat_classifier import figures
from models import restore_model

CLASSES3 = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    """A 1-epoch Part A run at 32 px with 5 conv stages (the last one's maps are 1x1) and 30 held-out photos."""
    root = make_dataset(tmp_path_factory.mktemp("figdata") / "ds", CLASSES3, n_train=8, n_val=10, size=32)
    out = tmp_path_factory.mktemp("figruns")
    argv = train_args(root, out, "deep", 1, "--conv_layers", "5", "--filters", "4", "--seed", "0")
    train_parta.main(train_parta.get_args_parser().parse_args(argv))
    return types.SimpleNamespace(root=root, run_dir=out / "deep", ckpt=out / "deep" / "best.pt")


def viz(*argv):
    return visualize.main(visualize.get_args_parser().parse_args([str(a) for a in argv]))


def test_feature_maps_leave_out_maps_too_small_to_show_and_say_so(deep_run, tmp_path, capsys):
    out = viz("feature_maps", "--ckpt", deep_run.ckpt, "--out", tmp_path, "--device", "cpu")
    printed = capsys.readouterr().out
    assert "left out features.4 (1x1): maps under 2x2 have no layout to show" in printed
    assert out.is_file()
    shown, left_out = figures.maps_worth_showing(
        {f"features.{i}": torch.zeros(1, 4, 32 >> (i + 1), 32 >> (i + 1)) for i in range(5)}
    )
    assert list(shown) == ["features.0", "features.1", "features.2", "features.3"] and left_out == ["features.4 (1x1)"]
    # Only such maps asked for: one line saying so, no figure of flat squares.
    with pytest.raises(visualize.UserError, match=r"left out features\.4 \(1x1\).*every layer"):
        viz("feature_maps", "--ckpt", deep_run.ckpt, "--layers", "features.4", "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def checkpoint_with_neurons(deep_run, dest, dead: int, alive: int):
    """deep_run's checkpoint with channel `dead` of the last stage's batch norm pushed far below zero (its
    activation never fires) and channel `alive` pushed above it (it fires everywhere)."""
    ck = torch.load(deep_run.ckpt, map_location="cpu", weights_only=True)
    state = ck["model_state"]
    state["features.4.1.weight"][dead] = 0.0
    state["features.4.1.bias"][dead] = -10.0
    state["features.4.1.bias"][alive] = 5.0
    dest.mkdir(parents=True)
    torch.save(ck, dest / "best.pt")
    return dest / "best.pt"


def test_guided_backprop_says_a_dead_neuron_never_fires(deep_run, tmp_path, capsys):
    ckpt_path = checkpoint_with_neurons(deep_run, tmp_path / "ck", dead=0, alive=1)
    argv = ["guided_backprop", "--ckpt", ckpt_path, "--n", "3", "--neuron", "features.4.2:0-1", "--device", "cpu"]
    assert viz(*argv).is_file()
    printed = capsys.readouterr().out
    assert "neuron features.4.2[0] never fires on 3 of 3 images" in printed
    assert "features.4.2[1] never fires" not in printed
    # The panels of that figure: the dead neuron's plain grey one says why it is grey, the live one does not.
    model, ckpt = restore_model(ckpt_path, torch.device("cpu"))
    args = visualize.get_args_parser().parse_args([str(a) for a in argv])
    rows = visualize.guided_backprop_rows(args, model, ckpt, torch.device("cpu"))
    assert len(rows) == 3
    for row in rows:
        (dead_map, dead_title), (alive_map, alive_title) = row[2], row[3]
        assert "features.4.2[0]" in dead_title and "never fires on this image (dead)" in dead_title
        assert torch.allclose(dead_map, torch.full_like(dead_map, 0.5))
        assert "features.4.2[1]" in alive_title and "never fires" not in alive_title
        assert not torch.allclose(alive_map, torch.full_like(alive_map, 0.5))


def test_prediction_grid_fits_a_page_and_keeps_its_ten_by_three_panels(deep_run, tmp_path):
    out = viz("predictions", "--ckpt", deep_run.ckpt, "--out", tmp_path, "--device", "cpu")
    with Image.open(out) as img:
        width, height = img.size
    assert height <= 1700 and width <= 1200, (width, height)  # at the default --dpi 110
    frames = len(colour_blobs(out, figures.RIGHT, 300)) + len(colour_blobs(out, figures.WRONG, 300))
    assert frames == 30


def test_evaluate_and_visualize_write_the_confusion_matrix_under_one_name(deep_run, tmp_path):
    evaluate.main(
        evaluate.get_args_parser().parse_args(
            ["--ckpt", str(deep_run.ckpt), "--out", str(tmp_path / "eval"), "--workers", "0", "--device", "cpu"]
        )
    )
    drawn = viz("confusion", "--ckpt", deep_run.ckpt, "--out", tmp_path / "viz", "--workers", "0", "--device", "cpu")
    assert [p.name for p in (tmp_path / "eval").glob("*.png")] == ["confusion_matrix.png"]
    assert drawn == tmp_path / "viz" / "confusion_matrix.png"
    assert [p.name for p in (tmp_path / "viz").iterdir()] == ["confusion_matrix.png"]
