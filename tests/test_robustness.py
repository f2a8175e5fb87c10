"""Reliability under faults: kills and signals, atomic writes, hostile checkpoints and archives, bad
images, non-finite losses, torchrun with gloo on CPU, and sweep agents racing for folders and the cache.

Everything runs on real files and real processes; nothing of our own code is mocked. Covered
elsewhere and not repeated here (see tests/test_download.py): corrupt / truncated / bad-CRC zips,
'../' and absolute zip entries, symlink entries, and a cut transfer resuming with a Range request.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import runpy
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import train_parta
from conftest import (
    COLOURS,
    DEFAULT_REF_FLAGS,
    PLAIN_REF_FLAGS,
    REF_EPOCHS,
    REPO,
    assert_one_line_error,
    clean_env,
    make_dataset,
    read_rows,
    run_cli,
    train_args,
)
from inat_classifier.checkpoint import CHECKPOINT_FORMAT, TrainState, atomic_torch_save, load_checkpoint
from inat_classifier.cli import UserError
from inat_classifier.download import download_dataset
from inat_classifier.images import load_image, photo_short_side
from inat_classifier.presets import Preprocess

MACHINE_FLAGS = ["--workers", "0", "--wandb", "disabled", "--device", "cpu"]


# ----------------------------------------------------------------------------- helpers
@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


class Proc:
    """A script started in the background from the repo root, output captured to files (no pipe stalls)."""

    def __init__(self, argv: list, log: Path, env: dict | None = None) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log.with_suffix(".out"), log.with_suffix(".err")
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.p = subprocess.Popen(
            [str(a) for a in argv],
            cwd=REPO,
            env=env or clean_env(),
            stdout=self._out,
            stderr=self._err,
            text=True,
            start_new_session=True,
        )  # its own group: a time-out kills torchrun's workers too

    def alive(self) -> bool:
        return self.p.poll() is None

    def wait(self, timeout: float = 300) -> Done:
        try:
            self.p.wait(timeout=timeout)
        finally:
            if self.p.poll() is None:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
            self._out.close(), self._err.close()
        return Done(self.p.returncode, self.out_path.read_text(), self.err_path.read_text())


def start_script(script: str, args: list, log: Path, env: dict | None = None) -> Proc:
    return Proc([sys.executable, REPO / script, *args], log, env)


def poll_until(condition, proc: Proc, timeout: float = 240, interval: float = 0.005) -> bool:
    """Wait until condition() holds while proc runs; False if proc ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not proc.alive():
            return bool(condition())
        time.sleep(interval)
    raise AssertionError("timed out waiting for the training process")


def try_load(path: Path) -> dict | None:
    """A checkpoint as it is on disk right now (it is replaced atomically, so never half-written)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def without_run_name(args: list[str]) -> list[str]:
    i = args.index("--run_name")
    return args[:i] + args[i + 2 :]


def run_dirs(out: Path) -> list[Path]:
    """Run folders under an --out_dir (each gets args.json; caches and logs do not)."""
    return sorted(p.parent for p in out.glob("*/args.json"))


def temp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or ".extract-" in str(p))


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v.float()).all().item() for v in state.values() if torch.is_tensor(v))


def resume(run_dir: Path, log: Path) -> Proc:
    return start_script("train_parta.py", ["--resume", run_dir, *MACHINE_FLAGS], log)


# ----------------------------------------------------------------------------- 1. SIGKILL and resume
def test_sigkill_mid_run_then_resume_reproduces_the_uninterrupted_run(default_reference, tmp_path):
    """kill -9 in epoch 2 (no handler runs), resume from last.pt: the same run as without the kill.

    Default Part A flags (augmentation and dropout on): last.pt from the end of epoch 1 plus the
    per-epoch seeds must replay epoch 2 exactly (the shared reference run is the uninterrupted one).
    """
    root, epochs = default_reference.data.root, REF_EPOCHS
    for attempt in range(3):
        run_dir = tmp_path / f"cut{attempt}"
        cut = start_script(
            "train_parta.py",
            train_args(root, tmp_path, run_dir.name, epochs, *DEFAULT_REF_FLAGS),
            tmp_path / "logs" / run_dir.name,
        )
        # the epoch-1 line is printed after metrics.csv, last.pt and curves.png: epoch 2 is starting
        epoch1_done = lambda cut=cut: f"epoch   1/{epochs}" in cut.out_path.read_text()  # noqa: E731
        if poll_until(epoch1_done, cut) and cut.alive():
            cut.p.send_signal(signal.SIGKILL)
            killed = cut.wait()
            break
        assert cut.wait().returncode == 0  # finished before the kill (very fast machine): try again
    else:
        pytest.fail("the run always finished before SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    rows_at_kill = read_rows(run_dir / "metrics.csv")
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 1 and last["batches_done"] == 0, last["epoch"]

    res = resume(run_dir, tmp_path / "logs" / "resume").wait()
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming {run_dir} after epoch {last['epoch']}\n" in res.stdout
    rows = read_rows(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))  # no duplicate, none missing
    assert rows[: len(rows_at_kill)] == rows_at_kill

    ref_rows = read_rows(default_reference.run_dir / "metrics.csv")
    for key in ("val_acc", "val_loss", "train_loss", "train_acc", "lr"):
        assert [round(float(r[key]), 5) for r in rows] == [round(float(r[key]), 5) for r in ref_rows], key
    a = load_checkpoint(run_dir / "last.pt")["model_state"]
    b = load_checkpoint(default_reference.run_dir / "last.pt")["model_state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-6), k


# ----------------------------------------------------------------------------- 2./3. signals, --save_every
def test_sigint_and_sigterm_mid_epoch_save_last_pt_exit_130_and_resume(default_reference, tmp_path):
    """--save_every 2 writes last.pt inside epochs; a signal then finishes the step, saves and exits 130;
    resuming that mid-epoch last.pt gives the same run as never stopping."""
    extra = [*DEFAULT_REF_FLAGS, "--save_every", "2"]  # ~26 steps an epoch, last.pt every 2nd
    root = default_reference.data.root
    procs, seen, after = {}, {}, {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # both runs side by side
        procs[sig] = start_script(
            "train_parta.py", train_args(root, tmp_path, sig.name, REF_EPOCHS, *extra), tmp_path / "logs" / sig.name
        )
    for sig, proc in procs.items():
        last = tmp_path / sig.name / "last.pt"

        def mid_epoch_checkpoint(sig=sig, last=last):
            seen[sig] = try_load(last)
            return seen[sig] is not None and seen[sig]["batches_done"] > 0

        assert poll_until(mid_epoch_checkpoint, proc), "no mid-epoch last.pt was ever written"
        proc.p.send_signal(sig)
    for sig, proc in procs.items():
        # 3. what --save_every wrote before any signal: a mid-epoch state with everything to resume
        ck = seen[sig]
        assert ck["batches_done"] % 2 == 0 and ck["batches_done"] > 0
        assert {"optimizer", "scheduler", "rng", "partial"} <= set(ck) and ck["partial"]["seen"] > 0
        done = proc.wait()
        run_dir = tmp_path / sig.name
        assert done.returncode == 130, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and f"{sig.name}: finishing this step" in done.stderr
        lines = [ln for ln in done.stderr.splitlines() if "--resume" in ln]
        assert lines == [f"interrupted: progress is in {run_dir / 'last.pt'}; continue with --resume {run_dir}"]
        after[sig] = load_checkpoint(run_dir / "last.pt")
        assert after[sig]["batches_done"] > 0  # the step in flight was finished and saved
    # Resuming a mid-epoch last.pt is the same path whichever signal wrote it: resume the SIGTERM one
    # (a cluster's preemption); tests/test_training.py resumes after SIGINT.
    run_dir = tmp_path / "SIGTERM"
    res = resume(run_dir, tmp_path / "logs" / "resume").wait()
    assert res.returncode == 0, res.stdout + res.stderr
    ck = after[signal.SIGTERM]
    assert f"resuming {run_dir} after epoch {ck['epoch']}, batch {ck['batches_done']}" in res.stdout
    rows = read_rows(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["train_acc"]) <= 1 and float(r["train_loss"]) > 0 for r in rows)
    final = load_checkpoint(run_dir / "last.pt")
    assert final["epoch"] == 2 and final["batches_done"] == 0 and all_finite(final["model_state"])
    # exact: augmentation and dropout continue from the saved RNG states (--save_every draws none)
    ref_rows = read_rows(default_reference.run_dir / "metrics.csv")
    for key in ("val_acc", "val_loss", "train_loss", "train_acc"):
        assert [round(float(r[key]), 5) for r in rows] == [round(float(r[key]), 5) for r in ref_rows], key
    ref_state = load_checkpoint(default_reference.run_dir / "last.pt")["model_state"]
    for k, v in final["model_state"].items():
        assert torch.allclose(v.float(), ref_state[k].float(), atol=1e-5), k


# ----------------------------------------------------------------------------- 4. atomic writes
class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def checkpoint_copy(trained_run, folder: Path) -> tuple[Path, Path, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    best, last = folder / "best.pt", folder / "last.pt"
    shutil.copy(trained_run.run_dir / "best.pt", best)
    shutil.copy(trained_run.run_dir / "last.pt", last)
    return best, last, best.read_bytes()


def assert_intact(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    assert load_checkpoint(path)["format"] == CHECKPOINT_FORMAT


def test_failed_pickling_keeps_old_checkpoints_and_leaves_no_temp_file(trained_run, tmp_path):
    best, last, before = checkpoint_copy(trained_run, tmp_path / "run")
    last_before = last.read_bytes()
    payload = {"format": CHECKPOINT_FORMAT, "model_state": {"w": torch.randn(256, 256)}, "bad": Unpicklable()}
    for target in (best, last):
        with pytest.raises(RuntimeError, match="cannot pickle"):
            atomic_torch_save(payload, target)
    assert_intact(best, before)
    assert_intact(last, last_before)
    with pytest.raises(RuntimeError):
        atomic_torch_save(payload, tmp_path / "run" / "new.pt")
    assert not (tmp_path / "run" / "new.pt").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "last.pt"]


def test_write_failing_half_way_keeps_old_checkpoint_and_leaves_no_temp_file(trained_run, tmp_path):
    """A real short write (EFBIG from RLIMIT_FSIZE, as on a full disk) while the temp file grows."""
    best, _, before = checkpoint_copy(trained_run, tmp_path / "run")
    payload = {"format": CHECKPOINT_FORMAT, "model_state": {"w": torch.randn(1024, 1024)}}  # 4 MB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, hard))
        with pytest.raises((OSError, RuntimeError)):
            atomic_torch_save(payload, best)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert_intact(best, before)
    assert temp_files(tmp_path / "run") == []
    atomic_torch_save(payload, best)  # and the next save works
    assert torch.equal(torch.load(best, weights_only=True)["model_state"]["w"], payload["model_state"]["w"])


def test_process_killed_while_saving_never_breaks_the_checkpoint(trained_run, tmp_path):
    """SIGKILL in the middle of torch.save (from inside the pickler): the old best.pt still loads."""
    best, _, before = checkpoint_copy(trained_run, tmp_path / "run")
    code = (
        "import os, signal, sys, torch\n"
        "from inat_classifier.checkpoint import atomic_torch_save\n"
        "from pathlib import Path\n"
        "class Die:\n"
        "    def __reduce__(self):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_torch_save({'a': torch.randn(512, 512), 'die': Die()}, Path(sys.argv[1]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(best)], cwd=REPO, env=clean_env(), capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert_intact(best, before)
    # What a kill cannot clean up stays hidden (a dot file) and is never taken for a checkpoint.
    assert all(name.startswith(".best.pt.tmp-") for name in temp_files(tmp_path / "run"))
    assert load_checkpoint(tmp_path / "run")["epoch"] == load_checkpoint(best)["epoch"]


# ----------------------------------------------------------------------------- 5. bad checkpoints
class OpenMarker:
    """Unpickling this would create the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class SystemMarker(OpenMarker):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def ours(trained_run) -> dict:
    return torch.load(trained_run.run_dir / "best.pt", map_location="cpu", weights_only=True)


def make_bad_checkpoint(kind: str, trained_run, folder: Path) -> tuple[Path, list[str]]:
    """(the --ckpt path, fragments the one-line error must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.pt"
    good = (trained_run.run_dir / "best.pt").read_bytes()
    if kind in ("text", "empty", "truncated", "zip_not_torch", "flipped_bytes"):
        return make_bad_file(kind, good, path)
    if kind == "other_architecture":
        ck = ours(trained_run)
        ck["spec"] = {**ck["spec"], "kwargs": {**ck["spec"]["kwargs"], "filters": 16}}
        torch.save(ck, path)
        return path, ["weights do not fit the model"]
    if kind == "other_class_count":
        ck = ours(trained_run)
        ck["class_names"] = ck["class_names"] + ["zebra"]  # classifier has 4 outputs, the model now 5
        torch.save(ck, path)
        return path, ["weights do not fit the model"]
    if kind == "other_class_names":
        ck = ours(trained_run)
        ck["class_names"] = ["ant", "bee", "cat", "dog"]  # fits the weights, not the data folder
        torch.save(ck, path)
        return path, ["differ from the checkpoint", "ant, bee, cat, dog"]
    if kind in ("pickle_open", "pickle_system"):
        marker = folder / f"{kind}.pwned"
        evil = (OpenMarker if kind == "pickle_open" else SystemMarker)(marker)
        torch.save({**ours(trained_run), "payload": evil}, path)
        return path, ["refused to load"]
    if kind == "plain_state_dict":
        torch.save(ours(trained_run)["model_state"], path)
        return path, ["not a checkpoint written by this tool"]
    if kind == "folder_without_best":
        return folder, ["checkpoint not found", str(folder / "best.pt")]
    if kind == "no_model_state":
        ck = ours(trained_run)
        del ck["model_state"]
        torch.save(ck, path)
        return path, ["model_state"]
    raise ValueError(kind)


def make_bad_file(kind: str, good: bytes, path: Path) -> tuple[Path, list[str]]:
    """A file that is no checkpoint, or a damaged copy of a good one's bytes (see make_bad_checkpoint)."""
    if kind == "text":
        path.write_text("this is not a checkpoint\n" * 20)
        return path, ["not a PyTorch checkpoint"]
    if kind == "empty":
        path.write_bytes(b"")
        return path, ["not a PyTorch checkpoint"]
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
        return path, ["not a PyTorch checkpoint, or truncated"]
    if kind == "zip_not_torch":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "a zip, but not from torch.save")
        return path, ["not a readable checkpoint"]
    raw = bytearray(good)  # flipped_bytes
    with zipfile.ZipFile(io.BytesIO(good)) as zf:
        big = max(zf.infolist(), key=lambda i: i.file_size)  # the largest tensor, stored uncompressed
    start = big.header_offset + 30 + len(big.filename.encode()) + 200
    for i in range(start, start + 64):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path, ["corrupt"]


def run_script_in_process(script: str, argv: list, capsys) -> Done:
    """The script's own `__main__` block in this process (no torch import per case).

    An exception that would end in a traceback propagates and fails the test.
    """
    old = sys.argv
    sys.argv = [str(REPO / script), *map(str, argv)]
    code = 0
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = e.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return Done(code, out.out, out.err)


BAD_CHECKPOINTS = [
    "text",
    "empty",
    "truncated",
    "zip_not_torch",
    "other_architecture",
    "other_class_count",
    "other_class_names",
    "pickle_open",
    "pickle_system",
    "plain_state_dict",
    "folder_without_best",
]
IN_A_REAL_PROCESS = {"text", "pickle_system"}  # the rest: same CLI code, in process


@pytest.mark.parametrize(
    "kind",
    BAD_CHECKPOINTS
    + [
        pytest.param("no_model_state"),
        pytest.param("flipped_bytes"),
    ],
)
def test_bad_checkpoint_is_one_line_error_naming_it_and_runs_nothing(kind, trained_run, tmp_path, capsys):
    ckpt, fragments = make_bad_checkpoint(kind, trained_run, tmp_path / "bad")
    argv = ["--ckpt", ckpt, "--split", "val", "--out", tmp_path / "eval", "--workers", "0", "--device", "cpu"]
    if kind in IN_A_REAL_PROCESS:
        proc = run_cli("evaluate.py", *argv, timeout=120)
    else:
        proc = run_script_in_process("evaluate.py", argv, capsys)
    line = assert_one_line_error(proc, *fragments)
    if kind not in ("folder_without_best", "other_class_names"):
        assert str(ckpt) in line
    assert not list((tmp_path / "bad").glob("*.pwned")), "unpickling ran code from the checkpoint"
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_resume_from_a_hostile_last_pt_is_refused_and_runs_nothing(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = tmp_path / "resume.pwned"
    ck = torch.load(trained_run.run_dir / "last.pt", map_location="cpu", weights_only=True)
    torch.save({**ck, "rng": {"torch": SystemMarker(marker)}}, run_dir / "last.pt")
    with pytest.raises(UserError, match="refused to load"):
        train_parta.main(train_parta.get_args_parser().parse_args(["--resume", str(run_dir), *MACHINE_FLAGS]))
    assert not marker.exists()


# ----------------------------------------------------------------------------- 6. archives (new cases only)
URL_PATH = "/datasets/nature_12K.zip"


def zip_bytes(entries: list) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, body)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["symlink_then_write_through_it", "drive_letter", "deep_dotdot"])
def test_escaping_archive_is_refused_and_nothing_lands_anywhere(kind, http_server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    entries = [("inaturalist_12K/train/a/ok.jpg", "fine", None)]
    if kind == "symlink_then_write_through_it":  # the classic two-step escape
        entries += [
            ("inaturalist_12K/train/link", str(outside), 0o120777),
            ("inaturalist_12K/train/link/evil.txt", "escaped", None),
        ]
    elif kind == "drive_letter":
        entries += [("C:/evil.txt", "escaped", None)]
    else:
        entries += [("inaturalist_12K/train/a/../../../../outside/evil.txt", "escaped", None)]
    http_server.files[URL_PATH] = zip_bytes(entries)
    dest = tmp_path / "data"
    with pytest.raises(UserError, match="refusing"):
        download_dataset(dest, http_server.url(URL_PATH))
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in dest.iterdir()) == ["nature_12K.zip"]  # no train/, no temp folder, no marker


@pytest.mark.parametrize("kind", ["name_too_long", "file_folder_clash"])
def test_archive_failing_during_extraction_is_a_user_error_and_leaves_nothing(kind, http_server, tmp_path):
    entries = [("inaturalist_12K/train/a/ok.jpg", "fine", None)]
    if kind == "name_too_long":
        entries += [("inaturalist_12K/train/a/" + "x" * 300 + ".jpg", "long", None)]
    else:
        entries += [("inaturalist_12K/val", "a file", None), ("inaturalist_12K/val/a/b.jpg", "below it", None)]
    http_server.files[URL_PATH] = zip_bytes(entries)
    dest = tmp_path / "data"
    try:
        with pytest.raises(UserError):
            download_dataset(dest, http_server.url(URL_PATH))
    finally:
        assert sorted(p.name for p in dest.iterdir()) == ["nature_12K.zip"]


def test_download_cli_refuses_a_zip_slip_archive_in_one_line(http_server, tmp_path):
    http_server.files[URL_PATH] = zip_bytes(
        [("inaturalist_12K/train/a/ok.jpg", "fine", None), ("../../evil.txt", "escaped", None)]
    )
    dest = tmp_path / "d" / "data"
    proc = run_cli("data.py", "download", "--dest", dest, "--url", http_server.url(URL_PATH), timeout=120)
    assert_one_line_error(proc, "refusing archive entry", "../../evil.txt")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "d" / "evil.txt").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["nature_12K.zip"]


# ----------------------------------------------------------------------------- 7. bad images
def decompression_bomb_png(path: Path, side: int = 10_000) -> None:
    """A valid greyscale PNG of side x side pixels (100 M > PIL's 89 M limit) in ~100 KB."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict:
    """2 classes x 13 train images, 3 of them unreadable, 3 odd but valid; 20 train / 6 val exactly."""
    root = make_dataset(tmp_path_factory.mktemp("badimg") / "ds", ["blue", "red"], n_train=10, n_val=2, size=32)
    blue, red = root / "train" / "blue", root / "train" / "red"
    files = {
        "bomb": blue / "bomb.png",
        "empty": blue / "empty.jpg",
        "truncated": red / "truncated.jpg",
        "exif6": red / "exif6.jpg",
        "png16": blue / "png16.png",
        "cmyk": red / "cmyk.jpg",
    }
    decompression_bomb_png(files["bomb"])
    files["empty"].write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), COLOURS["red"]).save(buf, "JPEG", quality=95)
    files["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    img = Image.new("RGB", (40, 24), COLOURS["red"])  # stored landscape, shown portrait
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(files["exif6"], "JPEG", exif=exif.tobytes())
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(files["png16"], "PNG")
    Image.new("RGB", (32, 32), COLOURS["red"]).convert("CMYK").save(files["cmyk"], "JPEG")
    return {"root": root, "files": files, "bad": ["bomb", "empty", "truncated"]}


def test_odd_and_unreadable_files_decode_or_fail_cleanly(bad_images):
    f = bad_images["files"]
    assert f["bomb"].stat().st_size < 1_000_000
    with pytest.raises((Image.DecompressionBombWarning, Image.DecompressionBombError)):
        load_image(str(f["bomb"]))
    for kind in ("empty", "truncated"):
        with pytest.raises(OSError):  # PIL's UnidentifiedImageError is one
            load_image(str(f[kind]))
    rotated = load_image(str(f["exif6"]))
    assert rotated.size == (24, 40) and rotated.mode == "RGB"
    grey = np.asarray(load_image(str(f["png16"])))
    assert grey.shape == (32, 32, 3) and abs(int(grey[0, 0, 0]) - 40000 // 256) <= 1
    cmyk = np.asarray(load_image(str(f["cmyk"])))
    assert cmyk.shape == (32, 32, 3) and abs(cmyk[..., 0].mean() - COLOURS["red"][0]) < 30


@pytest.fixture(scope="module")
def bad_image_runs(bad_images, tmp_path_factory) -> dict:
    """Two 2-epoch Part A runs over the bad images, side by side: --cache off and the default --cache auto
    (in $INAT_CACHE_DIR, which conftest points at a temp folder)."""
    out = tmp_path_factory.mktemp("badimg-runs")
    procs = {
        mode: start_script(
            "train_parta.py",
            train_args(
                bad_images["root"], out, mode, 2, "--batch_size", "10", "--cache", "off" if mode == "off" else "auto"
            ),  # the last --cache wins
            out / "logs" / mode,
        )
        for mode in ("off", "cache")
    }
    return {mode: (p.wait(), out / mode) for mode, p in procs.items()}


@pytest.mark.parametrize("mode", ["off", "cache"])
def test_training_over_bad_images_completes_and_reports_each_once(mode, bad_images, bad_image_runs):
    done, run_dir = bad_image_runs[mode]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert [int(r["epoch"]) for r in read_rows(run_dir / "metrics.csv")] == [1, 2]
    warnings = [ln for ln in done.stderr.splitlines() if "skipping unreadable image" in ln]
    assert len(warnings) == len(bad_images["bad"]), done.stderr
    for kind in bad_images["bad"]:
        assert sum(str(bad_images["files"][kind]) + " " in w for w in warnings) == 1, (kind, warnings)
    assert any("DecompressionBomb" in w for w in warnings if "bomb.png" in w), warnings
    for kind in ("exif6", "png16", "cmyk"):  # odd but valid: used, never reported
        assert str(bad_images["files"][kind]) not in done.stderr
    epoch_lines = [ln for ln in done.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 2
    if mode == "off":  # decoded every epoch: counted every epoch (20 train images, batch 10: none dropped)
        assert all("(3 unreadable images skipped)" in ln for ln in epoch_lines), epoch_lines
    else:  # decoded once while the cache is built: counted in the first epoch's summary only
        assert "unreadable images skipped" in epoch_lines[0] and "skipped" not in epoch_lines[1], epoch_lines


def test_cache_build_counts_each_unreadable_image_once(bad_image_runs):
    done, _ = bad_image_runs["cache"]
    first = next(ln for ln in done.stdout.splitlines() if ln.startswith("epoch "))
    assert "(3 unreadable images skipped)" in first, first


# ----------------------------------------------------------------------------- 8. non-finite loss
NAN_FLAGS = ["--optimizer", "adamw", "--lr", "1e3", "--label_smoothing", "0"]  # fine in epoch 1, NaN in 2


def test_nan_loss_stops_with_one_line_naming_epoch_batch_and_last_good_checkpoint(image_folder, tmp_path):
    proc = run_cli("train_parta.py", *train_args(image_folder.root, tmp_path, "nan", 3, *NAN_FLAGS))
    line = assert_one_line_error(proc, "loss became", "at epoch", ", batch", "stopped", "--lr")
    m = re.search(r"loss became (nan|inf|-inf) at epoch (\d+), batch (\d+)", line)
    assert m, line
    epoch = int(m.group(2))
    rows = read_rows(tmp_path / "nan" / "metrics.csv")
    assert len(rows) == epoch - 1  # every finished epoch recorded, the failed one not
    if epoch == 1:
        assert "Last good checkpoint: none yet" in line and not (tmp_path / "nan" / "last.pt").exists()
    else:
        assert f"Last good checkpoint: {tmp_path / 'nan' / 'last.pt'}" in line
        ck = load_checkpoint(tmp_path / "nan" / "last.pt")
        assert ck["epoch"] == epoch - 1 and all_finite(ck["model_state"])
    assert epoch == 2  # these flags, this seed: epoch 1 survives, epoch 2 does not (deterministic on CPU)


def parta_in_process(root: Path, out: Path, name: str, epochs: int, *extra) -> TrainState:
    args = train_parta.get_args_parser().parse_args(train_args(root, out, name, epochs, *extra))
    return train_parta.main(args)


def test_nan_in_the_first_epoch_says_no_checkpoint_yet(image_folder, tmp_path):
    with pytest.raises(UserError) as e:
        parta_in_process(
            image_folder.root, tmp_path, "sgd", 2, "--optimizer", "sgd", "--lr", "1e8", "--label_smoothing", "0"
        )
    msg = str(e.value)
    assert "loss became nan at epoch 1" in msg and "none yet" in msg and "\n" not in msg
    assert not (tmp_path / "sgd" / "last.pt").exists() and not (tmp_path / "sgd" / "best.pt").exists()


BLOWUP = ["--optimizer", "sgd", "--lr", "1e3", "--label_smoothing", "0", "--dropout", "0", "--no-augment"]


def test_nan_message_names_the_batch_where_the_loss_went_bad(image_folder, tmp_path):
    msgs = []
    for name, extra in (("every_step", ["--save_every", "1"]), ("default", [])):
        with pytest.raises(UserError) as e:
            parta_in_process(image_folder.root, tmp_path, name, 2, *BLOWUP, *extra)
        msgs.append(str(e.value).split(";")[0])
    import re

    (e1, b1), (e2, b2) = (map(int, re.search(r"epoch (\d+), batch (\d+)", m).groups()) for m in msgs)
    # Checking every batch stops at the update that made the weights non-finite (never saving
    # them); the default run names the first batch whose loss is non-finite: the next one.
    assert "weights became non-finite" in msgs[0] or msgs[0] == msgs[1]
    assert "loss became" in msgs[1]
    assert (e2, b2) in ((e1, b1), (e1, b1 + 1))


def test_the_checkpoint_named_last_good_holds_finite_weights(image_folder, tmp_path):
    with pytest.raises(UserError) as e:
        parta_in_process(image_folder.root, tmp_path, "blowup", 2, *BLOWUP, "--save_every", "1")
    assert f"Last good checkpoint: {tmp_path / 'blowup' / 'last.pt'}" in str(e.value)
    assert all_finite(load_checkpoint(tmp_path / "blowup" / "last.pt")["model_state"])


# ----------------------------------------------------------------------------- 9. torchrun, gloo on CPU
@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    """3 classes x 12 train images: --val_fraction 0.25 gives 9 validation images, odd for 2 processes."""
    return make_dataset(tmp_path_factory.mktemp("ddp") / "ds", ["blue", "green", "red"], n_train=12, n_val=2, size=32)


def torchrun(script: str, args: list, log: Path) -> Done:
    return Proc(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", REPO / script, *args], log
    ).wait(timeout=400)


def assert_one_run_folder(done: Done, out: Path, epochs: int) -> Path:
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    (run_dir,) = run_dirs(out)  # one folder: rank 1 used rank 0's
    assert [int(r["epoch"]) for r in read_rows(run_dir / "metrics.csv")] == list(range(1, epochs + 1))
    assert len([ln for ln in done.stdout.splitlines() if ln.startswith("epoch ")]) == epochs  # rank 0 prints
    assert len(json.loads((run_dir / "split.json").read_text())["val"]) == 9
    return run_dir


def assert_validation_matches_single_process_eval(run_dir: Path, data_dir: Path, tmp: Path) -> None:
    """best.pt evaluated in one process on the run's 9 validation images gives the logged val metrics."""
    rows = read_rows(run_dir / "metrics.csv")
    best = load_checkpoint(run_dir / "best.pt")
    row = rows[best["epoch"] - 1]
    val = json.loads((run_dir / "split.json").read_text())["val"]
    m = evaluate.main(
        evaluate.get_args_parser().parse_args(
            [
                "--ckpt",
                str(run_dir / "best.pt"),
                "--split",
                "val",
                "--data_dir",
                str(data_dir),
                "--out",
                str(tmp),
                "--workers",
                "0",
                "--device",
                "cpu",
            ]
        )
    )
    assert m["n"] == len(val)
    # an odd count split over 2 processes: a dropped or doubled image would change both numbers
    assert round(m["accuracy"], 4) == round(float(row["val_acc"]), 4), (m["accuracy"], row)
    assert round(m["loss"], 4) == round(float(row["val_loss"]), 4), (m["loss"], row)


def test_torchrun_two_gloo_processes_train_parta_with_exact_validation(ddp_data, tmp_path):
    out = tmp_path / "runs"
    # --no-augment: the decoded cache then holds exactly the eval resize (no training headroom), so
    # validation pixels equal evaluate.py's and the logged loss must match to 4 decimals.
    args = without_run_name(
        train_args(ddp_data, out, "x", 2, "--val_fraction", "0.25", "--label_smoothing", "0", "--no-augment")
    )
    run_dir = assert_one_run_folder(torchrun("train_parta.py", args, tmp_path / "logs" / "ddp"), out, 2)
    assert_validation_matches_single_process_eval(run_dir, ddp_data, tmp_path / "eval")


def test_torchrun_process_given_a_batch_of_unreadable_images_keeps_step_with_the_other(tmp_path):
    """--cache off, one image per process per step, one truncated JPEG: the process that gets it
    must still take every step, or the other one waits at the next all-reduce forever."""
    data_dir = make_dataset(tmp_path / "ds", ["blue", "red"], n_train=8, n_val=1, size=32)
    bad = sorted((data_dir / "train" / "blue").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:300])  # the header survives, the pixels do not
    out = tmp_path / "runs"
    args = train_args(data_dir, out, "x", 2, "--val_fraction", "0.25", "--cache", "off", "--batch_size", "2")
    done = Proc(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            REPO / "train_parta.py",
            *args,
        ],
        tmp_path / "logs",
    ).wait(timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert bad.relative_to(data_dir).as_posix() in json.loads((out / "x" / "split.json").read_text())["train"]
    assert "unreadable" in done.stdout + done.stderr
    assert [int(r["epoch"]) for r in read_rows(out / "x" / "metrics.csv")] == [1, 2]


def test_torchrun_two_processes_at_global_batch_b_equal_one_process_at_b(plain_reference, tmp_path):
    """2 gloo processes x 8 images end with the weights and metrics of 1 process x 16 (the shared reference).

    No dropout, augmentation or batch norm: each global batch is the same 16 images (rank r takes
    every other image of the epoch order), DDP averages the two halves' gradients, so only float
    summation order differs. A sampler that did not shard, a batch size not divided by the world,
    or a second process skipping the gradient all-reduce would change the weights far beyond 1e-5.
    """
    out = tmp_path / "runs"
    args = train_args(plain_reference.data.root, out, "ddp", REF_EPOCHS, *PLAIN_REF_FLAGS)
    done = torchrun("train_parta.py", args, tmp_path / "logs" / "ddp")
    assert done.returncode == 0, done.stdout + done.stderr
    rows, ref_rows = read_rows(out / "ddp" / "metrics.csv"), read_rows(plain_reference.run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, REF_EPOCHS + 1))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [float(r[key]) for r in rows] == pytest.approx([float(r[key]) for r in ref_rows], abs=2e-5), key
    a = load_checkpoint(out / "ddp" / "last.pt")["model_state"]
    b = load_checkpoint(plain_reference.run_dir / "last.pt")["model_state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    torch.manual_seed(plain_reference.args.seed)  # the initial weights both runs started from
    init = train_parta.build_model(plain_reference.args, len(plain_reference.data.classes)).state_dict()
    assert max((b[k] - init[k]).abs().max().item() for k in b) > 1e-2  # training moved them: 1e-5 is tight


@pytest.fixture(scope="module")
def ddp_nan(image_folder, tmp_path_factory) -> tuple[Done, Path]:
    """A torchrun job (2 gloo processes) whose loss becomes NaN in epoch 1 (SGD at lr 1e8)."""
    out = tmp_path_factory.mktemp("ddp-nan")
    args = without_run_name(
        train_args(
            image_folder.root, out / "runs", "x", 2, "--optimizer", "sgd", "--lr", "1e8", "--label_smoothing", "0"
        )
    )
    done = Proc(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            REPO / "train_parta.py",
            *args,
        ],
        out / "logs" / "nan",
    ).wait(timeout=180)  # a hang fails here
    return done, out / "runs"


NAN_LINE = r"^error: loss became (nan|inf|-inf) at epoch 1, batch (\d+); stopped instead of training on garbage"


def test_torchrun_nan_stops_both_processes_with_one_line(ddp_nan):
    """Both processes stop at the batch the group agreed on (none waits forever on a collective: the
    fixture would time out), leave the process group cleanly, and rank 0 alone says why, in one line;
    the job fails and no epoch is recorded."""
    done, out = ddp_nan
    out_err = done.stdout + done.stderr
    assert done.returncode != 0, out_err
    assert len(re.findall(NAN_LINE, done.stderr, re.M)) == 1, out_err
    assert len([ln for ln in out_err.splitlines() if ln.startswith("error:")]) == 1, out_err
    # No traceback of ours and no abort at exit; torchrun's launcher itself still reports the failed
    # child with its ChildFailedError, as for any job that exits non-zero.
    assert not re.search(rf'File "{re.escape(str(REPO))}/\w+\.py"', out_err), out_err  # a frame of our code
    assert "terminate called" not in out_err, out_err
    (run_dir,) = run_dirs(out)
    assert read_rows(run_dir / "metrics.csv") == [] and not (run_dir / "last.pt").exists()


@pytest.fixture(scope="module")
def partb_ddp(ddp_data, tmp_path_factory) -> tuple[Done, Path]:
    out = tmp_path_factory.mktemp("partb-ddp")
    args = [
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--freeze",
        "all",
        "--image_size",
        "32",
        "--data_dir",
        ddp_data,
        "--out_dir",
        out,
        "--cache",
        out / "_cache",
        "--batch_size",
        "8",
        "--epochs",
        "2",
        "--val_fraction",
        "0.25",
        "--label_smoothing",
        "0",
        *MACHINE_FLAGS,
    ]
    return torchrun("train_partb.py", args, out / "_logs" / "ddp"), out


def test_torchrun_two_gloo_processes_train_partb(partb_ddp):
    done, out = partb_ddp
    run_dir = assert_one_run_folder(done, out, 2)
    assert load_checkpoint(run_dir / "best.pt")["spec"]["name"] == "resnet18"


def test_torchrun_partb_validates_every_image_once(partb_ddp, ddp_data, tmp_path):
    done, out = partb_ddp
    assert_validation_matches_single_process_eval(assert_one_run_folder(done, out, 2), ddp_data, tmp_path / "eval")


def test_torchrun_partb_feature_cache_holds_the_whole_split(partb_ddp):
    done, out = partb_ddp
    assert done.returncode == 0, done.stderr
    (run_dir,) = run_dirs(out)
    split = json.loads((run_dir / "split.json").read_text())
    for part in ("train", "val"):
        (cached,) = (out / "feature_cache").glob(f"resnet18-{part}-*.pt")
        blob = torch.load(cached, weights_only=True)
        assert len(blob["labels"]) == len(split[part]), (part, len(blob["labels"]), len(split[part]))


# ----------------------------------------------------------------------------- 10. sweep agents racing
@pytest.fixture(scope="module")
def two_agents(image_folder, tmp_path_factory) -> dict:
    """Two identical Part A runs started together, no --run_name, one --cache folder to build."""
    base = tmp_path_factory.mktemp("agents")
    out, cache = base / "runs", base / "cache"
    args = [*without_run_name(train_args(image_folder.root, out, "x", 1)), "--cache", cache]  # last --cache wins
    procs = [start_script("train_parta.py", args, base / "logs" / f"agent{i}") for i in range(2)]
    return {"done": [p.wait() for p in procs], "out": out, "cache": cache}


def test_concurrent_agents_get_their_own_run_folders_and_share_one_cache(two_agents, image_folder):
    for done in two_agents["done"]:
        assert done.returncode == 0, done.stdout + done.stderr
    dirs = run_dirs(two_agents["out"])
    assert len(dirs) == 2, dirs
    folders = {d for done in two_agents["done"] for d in dirs if f"run folder: {d}\n" in done.stdout}
    assert folders == set(dirs)  # each agent reports its own folder
    for d in dirs:
        assert [int(r["epoch"]) for r in read_rows(d / "metrics.csv")] == [1]
        assert load_checkpoint(d / "best.pt")["epoch"] >= 1
    cache = two_agents["cache"]
    npys = list(cache.glob("*.npy"))
    assert len(npys) == 1, sorted(p.name for p in cache.iterdir())
    key = npys[0].stem
    assert (cache / f"{key}.json").is_file()
    assert temp_files(cache) == [] and not [p for p in cache.iterdir() if p.name.startswith(".")]
    # Part A augments by default (--crop_scale 0.5): the array keeps what its smallest crops need
    photos = [p for p, _ in data.discover(image_folder.root).train]
    side = Preprocess.for_size(32).stored_side_for(True, 0.5, max(map(photo_short_side, photos)))
    assert side > Preprocess.for_size(32).resize_size
    assert np.load(npys[0], mmap_mode="r").shape[1:] == (3, side, side)


def test_every_agent_is_told_about_the_unreadable_image(two_agents, image_folder):
    """The builder reports it while decoding; the agent that waited for it, from the cache's record."""
    for done in two_agents["done"]:
        warnings = [ln for ln in done.stderr.splitlines() if "skipping unreadable image" in ln]
        assert len(warnings) == 1 and str(image_folder.truncated) in warnings[0], done.stderr


def test_every_agent_counts_the_unreadable_image_once(two_agents):
    for done in two_agents["done"]:
        first = next(ln for ln in done.stdout.splitlines() if ln.startswith("epoch "))
        assert "(1 unreadable images skipped)" in first, first
