"""Shared helpers: a tiny learnable ImageFolder dataset, a CLI runner and a loopback HTTP server.

Everything is real files in tmp folders; nothing of our own code is mocked.
"""

from __future__ import annotations

import http.server
import io
import os
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Imagenette (10 ImageNet classes, a 224 px copy) for the tests on real photos; IMAGENETTE_DIR points elsewhere.
IMAGENETTE = Path(os.environ.get("IMAGENETTE_DIR", REPO.parent / "shared" / "data" / "imagenette224"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Solid, well separated colours: learnable in a couple of epochs at 32 px, even with noise.
COLOURS = {"blue": (40, 60, 210), "green": (40, 190, 60), "red": (210, 40, 40), "yellow": (220, 210, 40)}
CLASSES = sorted(COLOURS)
IMG_SIZE = 40
N_TRAIN = 32  # regular images per class in train/ (odd files come on top)
N_VAL = 10


# Two shared cores: one intra-op thread is ~10x faster than two threads fighting other processes.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: uses real photos from ../shared/data (runs by default)")


# ----------------------------------------------------------------------------- images
def noisy_colour(colour, size: int = IMG_SIZE, seed: int = 0, noise: float = 25.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.asarray(colour, dtype=np.float64)[None, None, :] + rng.normal(0, noise, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, colour, seed: int = 0, size: int = IMG_SIZE) -> Path:
    """A noisy solid-colour RGB image; JPEG or PNG by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(noisy_colour(colour, size, seed))
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, "JPEG", quality=90)
    else:
        img.save(path, "PNG")
    return path


def make_dataset(root: Path, classes=None, n_train: int = 6, n_val: int = 3, size: int = 32) -> Path:
    """root/train/<class>/ and root/val/<class>/ with noisy solid-colour images (no odd files)."""
    classes = classes or CLASSES
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, name in enumerate(classes):
            colour = COLOURS.get(name, ((ci * 70) % 256, (ci * 130) % 256, (ci * 190) % 256))
            for i in range(n):
                ext = ".jpg" if i % 2 else ".png"
                write_image(
                    root / split / name / f"{name}_{i:03d}{ext}",
                    colour,
                    seed=(split == "val") * 100_000 + ci * 1000 + i,
                    size=size,
                )
    return root


@dataclass
class Fixture:
    root: Path
    classes: list
    train_counts: dict  # image files (by extension) per class in train/, the truncated one included
    val_counts: dict
    odd: dict = field(default_factory=dict)  # kind -> path of the odd-but-valid images
    truncated: Path | None = None
    junk: list = field(default_factory=list)  # non-image files in train/


def build_fixture(root: Path) -> Fixture:
    make_dataset(root, CLASSES, N_TRAIN, N_VAL, IMG_SIZE)
    train = root / "train"
    odd = {}
    # Odd files, each in a class whose colour it still (roughly) shows.
    grey = Image.fromarray(noisy_colour(COLOURS["red"], seed=101)).convert("L")
    odd["grey_jpeg"] = train / "red" / "odd_grey.jpg"
    grey.save(odd["grey_jpeg"], "JPEG")
    odd["cmyk_jpeg"] = train / "red" / "odd_cmyk.jpg"
    Image.fromarray(noisy_colour(COLOURS["red"], seed=102)).convert("CMYK").save(odd["cmyk_jpeg"], "JPEG")
    rgba = Image.fromarray(noisy_colour(COLOURS["green"], seed=103)).convert("RGBA")
    alpha = np.full((IMG_SIZE, IMG_SIZE), 255, np.uint8)
    alpha[:4, :4] = 0  # a transparent corner: must come out white
    rgba.putalpha(Image.fromarray(alpha))
    odd["rgba_png"] = train / "green" / "odd_rgba.png"
    rgba.save(odd["rgba_png"], "PNG")
    odd["palette_png"] = train / "blue" / "odd_palette.png"
    Image.fromarray(noisy_colour(COLOURS["blue"], seed=104)).convert("P", palette=Image.ADAPTIVE).save(
        odd["palette_png"], "PNG"
    )
    odd["png16"] = train / "yellow" / "odd_16bit.png"
    Image.fromarray(np.full((IMG_SIZE, IMG_SIZE), 32768, np.uint16)).save(odd["png16"], "PNG")
    # A truncated JPEG: a valid file cut in half.
    truncated = train / "blue" / "odd_truncated.jpg"
    buf = io.BytesIO()
    Image.fromarray(noisy_colour(COLOURS["blue"], seed=105)).save(buf, "JPEG", quality=95)
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    junk = [train / "red" / "notes.txt", train / "green" / ".DS_Store"]
    junk[0].write_text("not an image\n")
    junk[1].write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    train_counts = {c: N_TRAIN for c in CLASSES}
    for p in [*odd.values(), truncated]:
        train_counts[p.parent.name] += 1
    return Fixture(root, list(CLASSES), train_counts, {c: N_VAL for c in CLASSES}, odd, truncated, junk)


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Nothing a test runs may write the decoded-image cache into the user's ~/.cache."""
    old = os.environ.get("INAT_CACHE_DIR")
    os.environ["INAT_CACHE_DIR"] = str(tmp_path_factory.mktemp("inat-cache"))
    yield
    if old is None:
        os.environ.pop("INAT_CACHE_DIR", None)
    else:
        os.environ["INAT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Fixture:
    """The shared small ImageFolder (read-only for tests: copy it before changing anything)."""
    return build_fixture(tmp_path_factory.mktemp("imagefolder") / "ds")


@pytest.fixture(scope="session")
def r18_file(tmp_path_factory) -> Path:
    """A local ImageNet-shaped resnet18 state_dict, as a user would save for an offline cluster."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(__import__("torchvision").models.resnet18().state_dict(), path)
    return path


# ----------------------------------------------------------------------------- CLI
def read_rows(path: Path) -> list[dict]:
    """metrics.csv rows as dicts; [] while the file does not exist yet."""
    import csv

    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TQDM_FORCE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(script: str, *args, env: dict | None = None, timeout: float = 240, check: bool = False):
    """Run `python <script> args...` from the repo root; returns the CompletedProcess (text)."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *fragments: str) -> str:
    """Exit code != 0, no traceback, and the last output line is 'error: ...' containing fragments."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [
        ln for ln in proc.stdout.splitlines() if ln.strip()
    ]
    assert last and last[-1].startswith("error:"), out
    for frag in fragments:
        assert frag in last[-1], (frag, last[-1])
    return last[-1]


def train_args(data_dir: Path, out_dir: Path, run_name: str, epochs: int = 3, *extra) -> list[str]:
    """Small, fast Part A flags for the fixture (32 px, 2 conv blocks, no workers, no W&B).

    The decoded-image cache goes to out_dir/_cache: per test, never the user's ~/.cache.
    """
    return [
        "--data_dir",
        str(data_dir),
        "--out_dir",
        str(out_dir),
        "--run_name",
        run_name,
        "--cache",
        str(Path(out_dir) / "_cache"),
        "--image_size",
        "32",
        "--conv_layers",
        "2",
        "--filters",
        "8",
        "--dense_neurons",
        "32",
        "--batch_size",
        "16",
        "--epochs",
        str(epochs),
        "--lr",
        "0.005",
        "--warmup_epochs",
        "0",
        "--workers",
        "0",
        "--wandb",
        "disabled",
        "--device",
        "cpu",
        *map(str, extra),
    ]


# ----------------------------------------------------------------------------- HTTP
class FileServer:
    """Serves byte blobs on 127.0.0.1 with `Range: bytes=N-` support; records every request.

    A path in `cut_first` gets, on its first GET, only half the body, then the connection closes (a
    dropped download); in `stall_first`, half the body, then nothing until `release` is set or the
    client gives up. A path in `no_length` is sent without Content-Length (the end of the body is
    the end of the connection); `redirects` maps a path to the Location of a 302.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.cut_first: set[str] = set()
        self.stall_first: set[str] = set()
        self.release = threading.Event()
        self.no_length: set[str] = set()
        self.redirects: dict[str, str] = {}
        self.ignore_range = False  # answer every request with 200 and the whole body
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_GET(self):
                owner.requests.append({"path": self.path, "range": self.headers.get("Range")})
                path = self.path.split("?")[0]
                if path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = owner.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                rng = None if owner.ignore_range else self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    payload = body[start:]
                else:
                    self.send_response(200)
                    payload = body
                self.send_header("Content-Type", "application/zip")
                if path in owner.no_length:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(payload)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if path in owner.cut_first or path in owner.stall_first:
                    stall = path in owner.stall_first
                    owner.cut_first.discard(path)
                    owner.stall_first.discard(path)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    if stall:
                        owner.release.wait(30)
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    server = FileServer()
    yield server
    server.close()


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    """A deflated zip of every file below folder, names relative to it (with an optional prefix)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return buf.getvalue()


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- a trained run
@dataclass
class TrainedRun:
    run_dir: Path
    state: object  # checkpoint.TrainState
    args: object  # the parsed flags
    data: Fixture


TRAINED_EPOCHS = 3


@pytest.fixture(scope="session")
def trained_run(image_folder, tmp_path_factory) -> TrainedRun:
    """One in-process Part A run on the fixture (32 px, 3 epochs, default augmentation and dropout)."""
    import train_parta

    out = tmp_path_factory.mktemp("runs")
    args = train_parta.get_args_parser().parse_args(
        train_args(image_folder.root, out, "trained", TRAINED_EPOCHS, "--seed", "0")
    )
    state = train_parta.main(args)
    return TrainedRun(out / "trained", state, args, image_folder)


# ----------------------------------------------------------------------------- shared reference runs
# One uninterrupted run per flag set, shared by every resume / DDP test that compares against it
# (tests/test_training.py, tests/test_robustness.py, tests/test_resume.py), so that stronger
# comparisons do not cost a reference run each.
REF_EPOCHS = 2
DEFAULT_REF_FLAGS = ["--batch_size", "4"]  # Part A's defaults: augmentation and dropout on
# Nothing random while training and no batch statistics: what 1 and 2 torchrun processes must agree on.
PLAIN_REF_FLAGS = ["--dropout", "0", "--no-augment", "--no-batch_norm"]


def _reference(image_folder, tmp_path_factory, name: str, flags: list) -> TrainedRun:
    import train_parta

    out = tmp_path_factory.mktemp(f"ref-{name}")
    args = train_parta.get_args_parser().parse_args(train_args(image_folder.root, out, name, REF_EPOCHS, *flags))
    return TrainedRun(out / name, train_parta.main(args), args, image_folder)


@pytest.fixture(scope="session")
def default_reference(image_folder, tmp_path_factory) -> TrainedRun:
    """Uninterrupted Part A run: default flags (augmentation, dropout, batch norm), batch 4, 2 epochs."""
    return _reference(image_folder, tmp_path_factory, "ref_default", DEFAULT_REF_FLAGS)


@pytest.fixture(scope="session")
def plain_reference(image_folder, tmp_path_factory) -> TrainedRun:
    """Uninterrupted Part A run without dropout, augmentation or batch norm: batch 16, 2 epochs."""
    return _reference(image_folder, tmp_path_factory, "ref_plain", PLAIN_REF_FLAGS)


@pytest.fixture
def imagenette() -> Path:
    """The Imagenette folder (train/ and val/), or a skip naming where it was looked for."""
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"Imagenette is not at {IMAGENETTE} (set IMAGENETTE_DIR)")
    return IMAGENETTE
