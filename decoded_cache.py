"""The decoded-image cache: every photo decoded once into one memory-mapped uint8 array, reused across runs."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from images import BAD_IMAGES, load_image

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """$INAT_CACHE_DIR, else $XDG_CACHE_HOME/inat-classifier, else ~/.cache/inat-classifier."""
    if os.environ.get("INAT_CACHE_DIR"):
        return Path(os.environ["INAT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "inat-classifier"


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
        h.update(f"\n{os.path.abspath(p)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


@dataclass
class DecodedCache:
    """Decoded images of a file list as one memory-mapped uint8 array (N, 3, S, S)."""

    images: np.ndarray
    valid: np.ndarray  # False where the file could not be decoded
    path: Path


def _build_cache_array(paths: Sequence[str], size: int, target: Path, workers: int) -> list[int]:
    """Decode everything in parallel into target (written in place, renamed by the caller)."""
    arr = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
    loader = torch.utils.data.DataLoader(_DecodeDataset(paths, size), batch_size=32, num_workers=workers,
                                         collate_fn=list)
    bad = []
    from tqdm import tqdm

    quiet = not sys.stderr.isatty()
    for batch in tqdm(loader, desc=f"decoding {len(paths)} images to {size}px", disable=quiet, leave=False):
        for i, img, reason in batch:
            if img is None:
                BAD_IMAGES.report(paths[i], reason)
                bad.append(i)
            else:
                arr[i] = img
    arr.flush()
    del arr
    with open(target, "rb+") as f:
        os.fsync(f.fileno())
    return bad


def open_decoded_cache(paths: Sequence[str], size: int, cache_dir: str | Path, workers: int = 0) -> DecodedCache:
    """The cache for these files at this size: reused when valid, (re)built otherwise.

    The array is renamed into place and its .json written last, so a build killed half way is
    never mistaken for a finished one; a lock file makes concurrent builders wait for one another.
    """
    import fcntl

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size)
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"

    def try_open(report: bool = True) -> DecodedCache | None:
        try:
            meta = json.loads(meta_path.read_text())
            images = np.load(array_path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if images.shape != (len(paths), 3, size, size) or meta.get("n") != len(paths):
            return None
        valid = np.ones(len(paths), dtype=bool)
        valid[meta["bad"]] = False
        for i in meta["bad"] if report else []:  # a reused cache still names the files it could not decode
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
        print(f"decoded cache: decoding {len(paths)} images to {size}x{size} px "
              f"({len(paths) * 3 * size * size / 2**30:.1f} GiB) in {cache_dir}", flush=True)
        tmp = cache_dir / f".{key}.{os.getpid()}.npy.tmp"
        try:
            bad = _build_cache_array(paths, size, tmp, workers)
            os.replace(tmp, array_path)
        finally:
            if tmp.exists():
                tmp.unlink()
        meta_tmp = meta_path.with_name(meta_path.name + f".{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps({"n": len(paths), "size": size, "bad": bad, "version": CACHE_VERSION}))
        os.replace(meta_tmp, meta_path)
    cache = try_open(report=False)  # the build has just reported them
    assert cache is not None
    return cache
