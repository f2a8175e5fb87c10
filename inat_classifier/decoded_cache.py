"""The decoded-image cache: every photo decoded once into one memory-mapped uint8 array, reused across runs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inat_classifier.cli import UserError
from inat_classifier.images import BAD_IMAGES, load_image
from inat_classifier.storage import (
    atomic_write,
    check_free_space,
    format_bytes,
    full_disk_is_one_line,
    move_into_place,
    remove_stale_temps,
    signals_held,
    temp_name,
)
from inat_classifier.tracking import progress, say, took

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """$INAT_CACHE_DIR, else $XDG_CACHE_HOME/inat-classifier, else ~/.cache/inat-classifier."""
    if os.environ.get("INAT_CACHE_DIR"):
        return Path(os.environ["INAT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "inat-classifier"


def unusable_reason(folder: Path) -> str | None:
    """Why the cache cannot be kept in folder (None when it can): created when missing, then written to.

    A file in the way (INAT_CACHE_DIR or XDG_CACHE_HOME naming a file), a parent that is a file,
    or a folder the user may not write: each found here, before a build is attempted.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return None


def choose_cache_dir(flag: str) -> tuple[Path | None, str]:
    """The folder for --cache auto|DIR and a note to print; None (decode every epoch) when auto's folder is unusable.

    A folder typed with --cache DIR that cannot be used is a one-line error; the default one, set
    by the environment, is not the user's choice for this run, so the run goes on without a cache.
    """
    folder = default_cache_dir() if flag == "auto" else Path(flag)
    why = unusable_reason(folder)
    if why is None:
        return folder, ""
    if flag != "auto":
        raise UserError(
            f"--cache {flag} cannot hold the decoded-image cache ({why}); pass another folder, or --cache off"
        )
    return None, (
        f"warning: the decoded-image cache folder {folder} cannot be used ({why}); decoding "
        f"every epoch instead, as --cache off (set INAT_CACHE_DIR or pass --cache DIR)"
    )


def decode_fixed(path: str, size: int) -> np.ndarray:
    """One image as uint8 (3, size, size): short side resized to `size` (as T.Resize), centre-cropped."""
    img = load_image(path, draft_size=size)
    w, h = img.size
    # torchvision's Resize(int) rule: the long side is truncated, not rounded.
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, decode_fixed(self.paths[i], self.size), ""
        except Exception as e:
            return i, None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def cache_key(paths: Sequence[str], size: int) -> str:
    """Changes when any file is added, removed, resized or touched, or the size changes."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{size}".encode())
    for p in paths:
        st = os.stat(p)
        # surrogateescape: a file name that is not UTF-8 hashes as its bytes on disk
        h.update(f"\n{os.path.abspath(p)}\t{st.st_size}\t{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


@dataclass
class DecodedCache:
    """Decoded images of a file list as one memory-mapped uint8 array (N, 3, S, S)."""

    images: np.ndarray
    valid: np.ndarray  # False where the file could not be decoded
    path: Path


def preallocate(target: Path, shape: tuple[int, ...]) -> np.memmap:
    """The array file with every block reserved on disk, then memory-mapped.

    A memory map over a sparse file dies of SIGBUS when the disk fills up mid-build; reserving
    the blocks first turns a full disk into an error before any image is decoded.
    """
    arr = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=shape)
    size = os.path.getsize(target)
    with open(target, "rb+") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                raise  # ENOSPC above all; filesystems without fallocate rely on the free-space check
    return arr


def _build_cache_array(paths: Sequence[str], size: int, target: Path, workers: int) -> list[int]:
    """Decode everything in parallel into target (written in place, renamed by the caller)."""
    arr = preallocate(target, (len(paths), 3, size, size))
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(paths, size), batch_size=32, num_workers=workers, collate_fn=list
    )
    bad = []
    start = time.perf_counter()
    with progress(total=len(paths), desc=f"decoding to {size}px", unit="img", leave=False) as bar:
        for batch in loader:
            for i, img, reason in batch:
                if img is None:
                    BAD_IMAGES.report(paths[i], reason)
                    bad.append(i)
                else:
                    arr[i] = img
            bar.update(len(batch))
    arr.flush()
    say(f"decoded cache: {len(paths)} images decoded {took(len(paths), start)}")
    del arr
    return bad


def read_index(meta_path: Path, array_path: Path, n: int, size: int) -> tuple[np.ndarray, list[int]] | None:
    """The cached array and its unreadable positions; None when absent, raises ValueError when damaged."""
    if not meta_path.exists() and not array_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="r")
    except OSError:
        return None  # a build killed before it wrote its index: rebuilt, nothing to report
    if not isinstance(meta, dict):
        raise ValueError("its index is not a mapping")
    bad = meta.get("bad")
    if (
        images.shape != (n, 3, size, size)
        or meta.get("n") != n
        or not isinstance(bad, list)
        or not all(isinstance(i, int) and 0 <= i < n for i in bad)
    ):
        raise ValueError("its index does not match its array")
    return images, bad


def build(paths: Sequence[str], size: int, cache_dir: Path, key: str, workers: int) -> None:
    """Decode the files into KEY.npy and write KEY.json last; temp files go whatever happens."""
    need = len(paths) * 3 * size * size
    print(
        f"decoded cache: decoding {len(paths)} images to {size}x{size} px ({format_bytes(need)}) in {cache_dir}",
        flush=True,
    )
    what = "the decoded-image cache (or pass --cache off, or --cache DIR)"
    check_free_space(cache_dir, need, what)
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    tmp = temp_name(array_path)
    meta_path.unlink(missing_ok=True)  # the index names a finished array: never an older one
    try:
        with full_disk_is_one_line(cache_dir, need, what):
            bad = _build_cache_array(paths, size, tmp, workers)  # Ctrl-C works here: the temp goes
            with signals_held():
                move_into_place(tmp, array_path)
    finally:
        tmp.unlink(missing_ok=True)
    index = json.dumps({"n": len(paths), "size": size, "bad": bad, "version": CACHE_VERSION})
    atomic_write(meta_path, lambda t: t.write_text(index), len(index), "the decoded-image cache's index")


def open_decoded_cache(paths: Sequence[str], size: int, cache_dir: str | Path, workers: int = 0) -> DecodedCache:
    """The cache for these files at this size: reused when valid, (re)built otherwise.

    The array is renamed into place and its .json written last, so a build killed half way is
    never mistaken for a finished one; a lock file makes concurrent builders wait for one another,
    and the one holding it removes what killed builds left behind. A damaged cache is rebuilt.
    """
    import fcntl

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size)
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"

    def try_open(report: bool = True) -> DecodedCache | None:
        try:
            found = read_index(meta_path, array_path, len(paths), size)
        except ValueError as e:
            print(f"decoded cache: {meta_path} is damaged ({e}); rebuilding it", flush=True)
            return None
        if found is None:
            return None
        images, bad = found
        valid = np.ones(len(paths), dtype=bool)
        valid[bad] = False
        for i in bad if report else []:  # a reused cache still names the files it could not decode
            BAD_IMAGES.report(paths[i], "could not be decoded when the cache was built")
        return DecodedCache(images, valid, array_path)

    cache = try_open()
    if cache is not None:
        return cache
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building this very cache
        cache = try_open()
        if cache is not None:
            return cache
        remove_stale_temps(cache_dir)  # killed builds' (their process is gone)
        build(paths, size, cache_dir, key, workers)
    cache = try_open(report=False)  # the build has just reported them
    assert cache is not None
    return cache
