"""data.py: discovery, the stratified split, robust image loading, bad-image skipping, stats CLI."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import assert_one_line_error, make_dataset, run_cli
from inat_classifier import images
from inat_classifier.cli import UserError
from inat_classifier.decoded_cache import decode_fixed
from inat_classifier.device_batches import DecodedRows, DeviceLoader, augment_params, model_inputs
from inat_classifier.images import BadImageLog, batch_to_device, load_image
from inat_classifier.presets import IMAGENET_MEAN, IMAGENET_STD, Preprocess


# ----------------------------------------------------------------------------- discovery
def test_discover_finds_classes_and_ignores_non_images(image_folder):
    ds = data.discover(image_folder.root)
    assert ds.classes == image_folder.classes
    assert ds.heldout_name == "val"
    names = [Path(p).name for p, _ in ds.train]
    assert "notes.txt" not in names and ".DS_Store" not in names
    assert all(data.is_image_file(p) for p, _ in ds.train + ds.heldout)
    train_counts = Counter(ds.classes[label] for _, label in ds.train)
    assert dict(train_counts) == image_folder.train_counts
    assert dict(Counter(ds.classes[label] for _, label in ds.heldout)) == image_folder.val_counts
    # every label matches the folder the file is in
    for path, label in ds.train + ds.heldout:
        assert Path(path).parent.name == ds.classes[label]


def test_discover_accepts_parent_folder_of_inaturalist_12K(tmp_path):
    make_dataset(tmp_path / "inaturalist_12K", ["a", "b"], n_train=2, n_val=1, size=16)
    ds = data.discover(tmp_path)
    assert ds.root == tmp_path / "inaturalist_12K" and ds.classes == ["a", "b"]


def test_missing_data_dir_is_a_user_error_naming_where_it_looked(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as e:
        data.discover(missing)
    msg = str(e.value)
    assert str(missing / "train") in msg and "download" in msg and "\n" not in msg


def test_empty_class_folder_is_a_one_line_user_error(tmp_path):
    root = make_dataset(tmp_path / "ds", ["a", "b"], n_train=2, n_val=1, size=16)
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "notes.txt").write_text("no images here")
    (root / "val" / "c").mkdir()
    shutil.copy(next((root / "val" / "a").iterdir()), root / "val" / "c" / "x.png")  # only train/c is empty
    with pytest.raises(UserError) as e:
        data.discover(root)
    assert str(root / "train" / "c") in str(e.value) and "no images" in str(e.value)
    assert "\n" not in str(e.value)


def test_class_folders_differing_between_train_and_val_is_a_user_error(tmp_path):
    root = make_dataset(tmp_path / "ds", ["a", "b"], n_train=2, n_val=1, size=16)
    shutil.rmtree(root / "val" / "b")
    make_dataset(tmp_path / "other", ["z"], n_train=0, n_val=1, size=16)
    shutil.move(str(tmp_path / "other" / "val" / "z"), str(root / "val" / "z"))
    with pytest.raises(UserError) as e:
        data.discover(root)
    msg = str(e.value)
    assert "only in train: ['b']" in msg and "only in val: ['z']" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- split
def synthetic_samples(per_class: dict[int, int]) -> list[tuple[str, int]]:
    return [(f"/d/train/c{label}/img_{i:04d}.jpg", label) for label, n in per_class.items() for i in range(n)]


@pytest.mark.parametrize(
    "fraction, expected",
    [
        # class sizes 10, 7, 3, 2, 1: round(fraction * n), at least 1 and at most n - 1 when n > 1
        (0.2, {0: 2, 1: 1, 2: 1, 3: 1, 4: 0}),
        (0.5, {0: 5, 1: 4, 2: 2, 3: 1, 4: 0}),
        (0.9, {0: 9, 1: 6, 2: 2, 3: 1, 4: 0}),
        (0.0, {0: 0, 1: 0, 2: 0, 3: 0, 4: 0}),
    ],
)
def test_stratified_split_keeps_each_class_fraction(fraction, expected):
    sizes = {0: 10, 1: 7, 2: 3, 3: 2, 4: 1}
    samples = synthetic_samples(sizes)
    train_idx, val_idx = data.stratified_split(samples, fraction, seed=0)
    val_counts = Counter(samples[i][1] for i in val_idx)
    assert {c: val_counts.get(c, 0) for c in sizes} == expected
    train_counts = Counter(samples[i][1] for i in train_idx)
    assert {c: train_counts.get(c, 0) for c in sizes} == {c: sizes[c] - expected[c] for c in sizes}
    assert not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(len(samples)))


def test_stratified_split_on_the_fixture(image_folder):
    ds = data.discover(image_folder.root)
    train_idx, val_idx = data.stratified_split(ds.train, 0.25, seed=3)
    for label, name in enumerate(ds.classes):
        n = image_folder.train_counts[name]
        assert sum(ds.train[i][1] == label for i in val_idx) == round(0.25 * n)
    assert not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(len(ds.train)))


def test_stratified_split_is_deterministic_per_seed_and_independent_of_input_order():
    samples = synthetic_samples({0: 50, 1: 40, 2: 30})
    a = data.stratified_split(samples, 0.2, seed=7)
    assert a == data.stratified_split(samples, 0.2, seed=7)
    assert a[1] != data.stratified_split(samples, 0.2, seed=8)[1]
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    b = data.stratified_split(shuffled, 0.2, seed=7)
    assert {samples[i][0] for i in a[1]} == {shuffled[i][0] for i in b[1]}


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(UserError, match="val_fraction"):
        data.stratified_split(synthetic_samples({0: 5}), fraction, seed=0)


def test_split_json_round_trip_survives_moving_the_dataset(tmp_path):
    root = make_dataset(tmp_path / "a", ["x", "y"], n_train=5, n_val=1, size=16)
    ds = data.discover(root)
    tr, va = data.stratified_split(ds.train, 0.4, seed=1)
    saved = data.split_to_json(ds.root, ds.train, tr, va)
    moved = tmp_path / "b"
    shutil.move(str(root), str(moved))
    train_s, val_s = data.split_from_json(moved, saved, ds.classes)
    rel = lambda s: [(str(Path(p).relative_to(moved)), lab) for p, lab in s]  # noqa: E731
    assert rel(train_s) == [(str(Path(ds.train[i][0]).relative_to(root)), ds.train[i][1]) for i in tr]
    assert rel(val_s) == [(str(Path(ds.train[i][0]).relative_to(root)), ds.train[i][1]) for i in va]
    assert all(Path(p).is_file() for p, _ in train_s + val_s)


# ----------------------------------------------------------------------------- images
@pytest.mark.parametrize("kind", ["grey_jpeg", "cmyk_jpeg", "rgba_png", "palette_png", "png16"])
def test_odd_image_modes_load_as_8bit_rgb(image_folder, kind):
    path = image_folder.odd[kind]
    with Image.open(path) as raw:
        assert raw.mode != "RGB"  # the fixture really is odd
    img = load_image(str(path))
    assert img.mode == "RGB" and img.size == (40, 40)
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (40, 40, 3)
    mean = arr.reshape(-1, 3).mean(0)
    if kind == "png16":  # 32768 of 65535 must become mid grey, not clipped white
        assert np.all(np.abs(mean - 128) < 2)
    elif kind == "rgba_png":
        assert (arr[:4, :4] == 255).all()  # transparent corner over white
        assert mean[1] > mean[0] + 60 and mean[1] > mean[2] + 60  # still green
    elif kind == "cmyk_jpeg":
        assert mean[0] > mean[1] + 100 and mean[0] > mean[2] + 100  # still red, not inverted
    elif kind == "palette_png":
        assert mean[2] > mean[0] + 100  # still blue
    elif kind == "grey_jpeg":
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(path, "JPEG", exif=exif)
    assert load_image(str(path)).size == (20, 40)


def test_truncated_jpeg_raises_in_load_image(image_folder):
    with pytest.raises(OSError):
        load_image(str(image_folder.truncated))


def test_unreadable_image_is_reported_once_and_skipped(image_folder, monkeypatch, capsys):
    monkeypatch.setattr(images, "BAD_IMAGES", BadImageLog())  # a fresh per-process log
    good = sorted((image_folder.root / "val" / "red").glob("*"))[:3]
    paths = [str(good[0]), str(image_folder.truncated), str(good[1]), str(good[2])]
    # Two worker processes decode (--cache off): the report must still reach the main process's log and count.
    loader = DeviceLoader(
        DecodedRows(paths, 36, workers=2), [0, 1, 0, 0], 2, Preprocess(32, 36), torch.device("cpu"), augment=False
    )
    for _ in range(2):  # two epochs
        batches = [batch_to_device(b, torch.device("cpu")) for b in loader]
        assert [b[0].shape[0] for b in batches] == [1, 2]  # the bad one dropped from its batch
        assert batches[0][1].tolist() == [0]
        assert images.BAD_IMAGES.take_epoch_count() == 1
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image") == 1 and str(image_folder.truncated) in err


def test_batch_of_only_bad_images_is_none(image_folder, monkeypatch, capsys):
    monkeypatch.setattr(images, "BAD_IMAGES", BadImageLog())
    loader = DeviceLoader(
        DecodedRows([str(image_folder.truncated)], 36, workers=0),
        [0],
        1,
        Preprocess(32, 36),
        torch.device("cpu"),
        augment=True,
    )
    (batch,) = list(loader)
    assert batch == (None, None) and batch_to_device(batch, torch.device("cpu")) is None
    assert str(image_folder.truncated) in capsys.readouterr().err


@pytest.mark.parametrize("augment", [False, True])
def test_model_inputs_are_normalised_tensors_of_image_size(image_folder, augment):
    pre = Preprocess.for_size(32)
    rows = torch.from_numpy(decode_fixed(str(image_folder.odd["rgba_png"]), pre.decode_side))[None]
    top, side = pre.eval_region(pre.decode_side)
    centre = rows[..., top : top + side, top : top + side]
    params = augment_params(1, pre.decode_side, torch.Generator().manual_seed(0)) if augment else None
    x = model_inputs(rows if augment else centre, pre, params)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    # eval is deterministic (never augmented)
    assert torch.equal(model_inputs(centre, pre), model_inputs(centre, pre))
    # normalised with ImageNet statistics: a white pixel maps to (1 - mean) / std
    white = model_inputs(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8), pre)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(white[0, :, 0, 0], expected, atol=1e-5)


# ----------------------------------------------------------------------------- stats CLI
def test_stats_cli_prints_counts_and_unreadable_files(image_folder, tmp_path):
    out_json = tmp_path / "stats.json"
    proc = run_cli("data.py", "stats", "--data_dir", image_folder.root, "--json", out_json)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("class"))
    assert header.split() == ["class", "train", "val"]
    for name in image_folder.classes:
        row = next(ln for ln in lines if ln.split()[:1] == [name])
        assert row.split()[1:] == [str(image_folder.train_counts[name]), str(image_folder.val_counts[name])]
    assert "unreadable files: 1" in lines
    assert any(str(image_folder.truncated) in ln for ln in lines)
    import json

    stats = json.loads(out_json.read_text())
    assert [p for p, _ in stats["unreadable"]] == [str(image_folder.truncated)]


def test_stats_cli_missing_data_dir_is_one_line_error(tmp_path):
    proc = run_cli("data.py", "stats", "--data_dir", tmp_path / "none")
    assert_one_line_error(proc, "no dataset found", "download")
