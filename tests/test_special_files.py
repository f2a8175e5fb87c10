"""Special files and links in the data folder: FIFOs, sockets, devices, broken links, hard links,
over-limit photos and hidden class folders, on every path that reads photos.

Real files throughout: os.mkfifo, a bound Unix socket, os.symlink and os.link in tmp_path; a FIFO
is tested in child processes with a timeout, since opening one blocks forever.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
from PIL import Image

import data
import evaluate
import train_parta
from conftest import CLASSES, make_dataset, run_cli, train_args, write_image
from inat_classifier import inference
from inat_classifier.cli import UserError
from inat_classifier.images import BAD_IMAGES


def parta(args: list[str]):
    return train_parta.main(train_parta.get_args_parser().parse_args(args))


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", CLASSES[:2], n_train=4, n_val=2)


def lines_naming(text: str, path: Path) -> list[str]:
    return [ln for ln in text.splitlines() if str(path) in ln]


# ----------------------------------------------------------------------------- FIFOs, sockets, devices
def special_files(folder: Path, monkeypatch) -> list[Path]:
    """A FIFO, a Unix socket and a link to a character device, each named like a photo."""
    fifo, sock, dev = folder / "x.jpg", folder / "s.jpg", folder / "d.jpg"
    os.mkfifo(fifo)
    monkeypatch.chdir(folder)  # a relative name: socket paths are limited to ~100 characters
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("s.jpg")
    server.close()
    os.symlink("/dev/null", dev)
    return [fifo, sock, dev]


def test_fifos_sockets_and_devices_are_left_out_each_with_one_warning(ds, monkeypatch, capsys):
    odd = special_files(ds / "train" / CLASSES[0], monkeypatch)
    os.mkfifo(ds / "loose.png")
    found = data.discover(ds)
    err = capsys.readouterr().err
    assert len(found.train) == 8 and not {str(p) for p in odd} & {p for p, _ in found.train}
    for path, kind in zip(odd, ("a FIFO", "a socket", "a character device"), strict=True):
        warned = lines_naming(err, path)
        assert len(warned) == 1 and warned[0].startswith(f"warning: skipping {path}: {kind}"), err
        assert "not a regular file" in warned[0]
    assert inference.collect_images([str(ds / "train" / CLASSES[0]), str(ds / "loose.png")]) == [
        p for p, _ in found.train if CLASSES[0] in Path(p).parent.name
    ]
    err = capsys.readouterr().err
    assert all(len(lines_naming(err, p)) == 1 for p in [*odd, ds / "loose.png"]), err


def test_a_fifo_among_the_photos_does_not_hang_stats_or_training(ds, tmp_path):
    fifo = ds / "train" / CLASSES[0] / "x.jpg"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "pipe")
    os.symlink(tmp_path / "pipe", ds / "val" / CLASSES[1] / "linked_fifo.jpg")  # through a link too
    stats = run_cli("data.py", "stats", "--data_dir", ds, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert "unreadable files: 0" in stats.stdout and len(lines_naming(stats.stderr, fifo)) == 1
    assert len(lines_naming(stats.stderr, ds / "val" / CLASSES[1] / "linked_fifo.jpg")) == 1
    run = run_cli("train_parta.py", *train_args(ds, tmp_path / "runs", "r", 1), timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(lines_naming(run.stderr, fifo)) == 1 and (tmp_path / "runs" / "r" / "best.pt").exists()


# ----------------------------------------------------------------------------- broken links
def test_a_broken_link_is_skipped_the_same_way_with_and_without_the_cache(ds, tmp_path, monkeypatch, capsys):
    link = ds / "train" / CLASSES[0] / "gone.jpg"
    os.symlink(tmp_path / "moved_away.jpg", link)
    monkeypatch.setenv("INAT_CACHE_DIR", str(tmp_path / "auto_cache"))
    seen = {}
    for cache in ("auto", str(tmp_path / "dir_cache"), "off"):
        state = parta(train_args(ds, tmp_path / "runs", cache[-3:], 1, "--cache", cache))  # the last --cache wins
        seen[cache] = lines_naming(capsys.readouterr().err, link)
        assert state.epoch == 1
    assert [len(v) for v in seen.values()] == [1, 1, 1] and len({v[0] for v in seen.values()}) == 1, seen
    assert "does not exist" in seen["off"][0]


# ----------------------------------------------------------------------------- hard links
@pytest.mark.parametrize("where", ["other class", "held-out split"])
def test_a_hard_linked_photo_in_two_places_is_the_error_a_symlink_gives(ds, where):
    photo = ds / "train" / CLASSES[0] / f"{CLASSES[0]}_001.jpg"
    split, cls = ("train", CLASSES[1]) if where == "other class" else ("val", CLASSES[0])
    os.link(photo, ds / split / cls / "copy.jpg")
    with pytest.raises(UserError, match="the same photo is in two places") as e:
        data.discover(ds)
    assert str(photo) in str(e.value) and "copy.jpg" in str(e.value)


def test_hard_links_are_one_photo_for_training_and_evaluate(ds, tmp_path):
    parta(train_args(ds, tmp_path / "runs", "r", 1))
    photo = ds / "train" / CLASSES[0] / f"{CLASSES[0]}_001.jpg"
    os.link(photo, ds / "train" / CLASSES[0] / "again.jpg")  # within one class: counted once
    assert len(data.discover(ds).train) == 8
    os.link(photo, ds / "val" / CLASSES[0] / "leak.jpg")
    ev = evaluate.get_args_parser().parse_args(
        ["--ckpt", str(tmp_path / "runs" / "r" / "best.pt"), "--device", "cpu", "--workers", "0"]
    )
    with pytest.raises(UserError, match="the same photo is in two places.*leak.jpg"):
        evaluate.main(ev)
    with pytest.raises(UserError, match="the same photo is in two places.*leak.jpg"):
        parta(train_args(ds, tmp_path / "runs", "r2", 1))
    assert not (tmp_path / "runs" / "r2").exists()


# ----------------------------------------------------------------------------- over-limit photos
def test_a_100_megapixel_png_is_skipped_on_every_path_with_one_line_naming_the_limit(ds, tmp_path, capsys):
    big = ds / "train" / CLASSES[0] / "huge.png"
    Image.new("1", (10_000, 10_000), 1).save(big)  # 100 MP, over PIL's 89 MP limit, in a few KB
    assert big.stat().st_size < 200_000
    outputs = {}
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        for cache in ("cache", "off"):
            BAD_IMAGES.seen.clear()  # each file is reported once per process: here, once per run
            parta(train_args(ds, tmp_path / "runs", cache, 1, *(["--cache", "off"] if cache == "off" else [])))
            outputs[cache] = capsys.readouterr().err
        BAD_IMAGES.seen.clear()
        evaluate.main(
            evaluate.get_args_parser().parse_args(
                [
                    "--ckpt",
                    str(tmp_path / "runs" / "cache" / "best.pt"),
                    "--device",
                    "cpu",
                    "--workers",
                    "0",
                    "--predict",
                    str(big),
                    str(ds / "val" / CLASSES[0]),
                ]
            )
        )
        outputs["predict"] = capsys.readouterr().err
    assert not [w for w in raised if issubclass(w.category, Image.DecompressionBombWarning)]
    for where, err in outputs.items():
        found = lines_naming(err, big)
        assert len(found) == 1 and "10000x10000 is 100 megapixels, over the 89-megapixel limit" in found[0], (
            where,
            err,
        )
    unreadable = data.dataset_stats(ds)["unreadable"]
    assert [p for p, _ in unreadable] == [str(big)] and "over the 89-megapixel limit" in unreadable[0][1]


# ----------------------------------------------------------------------------- hidden class folders
def test_a_hidden_class_folder_is_named_in_one_warning(ds, capsys):
    write_image(ds / "train" / ".hidden" / "a.jpg", (200, 30, 30))
    assert data.discover(ds).classes == CLASSES[:2]
    warned = lines_naming(capsys.readouterr().err, ds / "train" / ".hidden")
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "not classes" in warned[0], warned
