"""Dataset discovery, the stratified train/val split, transforms, robust image loading and download.

Importable module plus a small CLI:
    python data.py download [--dest data] [--url URL]
    python data.py stats --data_dir data/inaturalist_12K
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

DEFAULT_DATA_DIR = "data/inaturalist_12K"
DATASET_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval images are resized so the short side is image_size / CROP_RATIO, then centre-cropped
# (the standard 0.875 ratio); the decoded cache stores images at that size.
CROP_RATIO = 0.875
HELDOUT_NAMES = ("test", "val")

# Keep PIL strict: a truncated file must raise (and be skipped), not decode as grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UserError(Exception):
    """Bad input from the user: the scripts print it as one line and exit, no traceback."""


# ----------------------------------------------------------------------------- discovery
@dataclass
class Dataset:
    """The files of one dataset root: class names and (path, label) samples per split."""

    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    heldout: list[tuple[str, int]]
    heldout_name: str


def is_image_file(path: str | Path) -> bool:
    name = os.path.basename(str(path))
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def list_class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def list_images(class_dir: Path) -> list[str]:
    """Image files below one class folder (recursively), sorted so order never depends on the OS."""
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
    return sorted(files)


def resolve_data_dir(data_dir: str | Path) -> Path:
    """The folder that holds train/; accepts the zip's parent folder too."""
    root = Path(data_dir).expanduser()
    if (root / "train").is_dir():
        return root
    if (root / "inaturalist_12K" / "train").is_dir():
        return root / "inaturalist_12K"
    raise UserError(
        f"no dataset found: looked for {root / 'train'}/<class>/*.jpg; get iNaturalist 12K with "
        f"'python data.py download --dest data' (or add --download), or pass --data_dir DIR"
    )


def find_heldout_dir(root: Path) -> tuple[Path, str] | None:
    for name in HELDOUT_NAMES:
        if (root / name).is_dir():
            return root / name, name
    return None


def scan_split(split_dir: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    samples = []
    for label, name in enumerate(classes):
        files = list_images(split_dir / name)
        if not files:
            raise UserError(f"class folder {split_dir / name} has no images")
        samples.extend((f, label) for f in files)
    return samples


def discover(data_dir: str | Path, need_heldout: bool = False) -> Dataset:
    """Find classes and samples; class folders must match between train/ and the held-out split."""
    root = resolve_data_dir(data_dir)
    classes = list_class_dirs(root / "train")
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders (expected train/<class>/*.jpg)")
    heldout = find_heldout_dir(root)
    heldout_samples: list[tuple[str, int]] = []
    heldout_name = ""
    if heldout is not None:
        held_dir, heldout_name = heldout
        held_classes = list_class_dirs(held_dir)
        if held_classes != classes:
            only_train = sorted(set(classes) - set(held_classes))
            only_held = sorted(set(held_classes) - set(classes))
            raise UserError(
                f"class folders differ between {root / 'train'} and {held_dir}: "
                f"only in train: {only_train or 'none'}; only in {heldout_name}: {only_held or 'none'}"
            )
        heldout_samples = scan_split(held_dir, classes)
    elif need_heldout:
        raise UserError(f"no held-out split: expected {root / 'val'} or {root / 'test'}")
    return Dataset(root, classes, scan_split(root / "train", classes), heldout_samples, heldout_name)


# ----------------------------------------------------------------------------- split
def stratified_split(
    samples: Sequence[tuple[str, int]], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of train and val: `val_fraction` of every class, the same for the same seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(seed)
    train_idx, val_idx = [], []
    for label in sorted(by_class):
        idx = sorted(by_class[label], key=lambda i: samples[i][0])
        rng.shuffle(idx)
        n_val = round(len(idx) * val_fraction)
        if val_fraction > 0 and len(idx) > 1:
            n_val = max(n_val, 1)  # every class in both parts
        n_val = min(n_val, len(idx) - 1)  # never leave a class without training images
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return sorted(train_idx), sorted(val_idx)


def split_to_json(root: Path, samples, train_idx, val_idx) -> dict:
    """The split as paths relative to the data root, so it survives moving the dataset."""
    rel = lambda i: os.path.relpath(samples[i][0], root)  # noqa: E731
    return {"train": [rel(i) for i in train_idx], "val": [rel(i) for i in val_idx]}


def split_from_json(root: Path, split: dict, classes: Sequence[str]) -> tuple[list, list]:
    """Samples of a saved split; the label comes from the class folder in the path."""
    index = {c: i for i, c in enumerate(classes)}

    def load(rel_paths):
        out = []
        for rel in rel_paths:
            cls = Path(rel).parts[1] if len(Path(rel).parts) > 2 else Path(rel).parts[0]
            if cls not in index:
                raise UserError(f"saved split names class '{cls}' that is not among {list(classes)}")
            out.append((str(root / rel), index[cls]))
        return out

    return load(split["train"]), load(split["val"])


# ----------------------------------------------------------------------------- images
def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF rotation applied, 16-bit scaled, alpha over white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bit instead of clipping everything to white.
        img = img.point(lambda v: v / 256).convert("L")
    elif img.mode == "F":
        img = img.convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return background
    return img.convert("RGB")


def load_image(path: str, draft_size: int | None = None) -> Image.Image:
    """Decode one file to RGB. Raises on unreadable, truncated or decompression-bomb files."""
    with warnings.catch_warnings():
        # A huge image is an error here, not a warning: it would stall a worker for seconds.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if draft_size and img.format == "JPEG":
                # DCT-domain downscaling: decode at 1/2..1/8 size when the target is much smaller.
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return to_rgb(img)


class BadImageLog:
    """Reports each unreadable file once per process and counts skips for the epoch summary."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.epoch_count = 0

    def report(self, path: str, reason: str) -> None:
        self.epoch_count += 1
        if path not in self.seen:
            self.seen.add(path)
            print(f"warning: skipping unreadable image {path} ({reason})", file=sys.stderr)

    def take_epoch_count(self) -> int:
        n, self.epoch_count = self.epoch_count, 0
        return n


BAD_IMAGES = BadImageLog()


class ImageListDataset(torch.utils.data.Dataset):
    """(path, label) samples decoded with PIL; an unreadable file yields None (dropped by collate)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            img = load_image(path)
        except Exception as e:  # any decode failure: skip the file, never end the run
            return ("__bad__", path, f"{type(e).__name__}: {e}".splitlines()[0][:200])
        return (self.transform(img) if self.transform else img), label


def collate_skip_bad(batch):
    """Collate the readable samples; returns (x, y, bad) so the main process, not a worker,
    reports the unreadable files (x and y are None when none of the batch was readable)."""
    good, bad = [], []
    for item in batch:
        if isinstance(item, tuple) and len(item) == 3 and item[0] == "__bad__":
            bad.append(item[1:])
        else:
            good.append(item)
    if not good:
        return None, None, bad
    x, y = torch.utils.data.default_collate(good)
    return x, y, bad


# ----------------------------------------------------------------------------- sampling
class EpochSampler(torch.utils.data.Sampler):
    """Shuffled order fixed by (seed, epoch), so a resumed run sees the same batches.

    `skip` drops the first samples of the epoch (resume mid-epoch); `rank`/`world` shard the
    order for DistributedDataParallel.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                 pad: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world, self.pad = n, seed, shuffle, rank, world, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        idx = self.order()
        if self.world > 1:
            if self.pad:  # every rank gets the same count, as DistributedSampler does
                idx += idx[: (-len(idx)) % self.world]
            idx = idx[self.rank :: self.world]
        return iter(idx[self.skip :])

    def __len__(self) -> int:
        if self.world == 1 or self.pad:
            return math.ceil(self.n / self.world) - self.skip
        return len(range(self.rank, self.n, self.world)) - self.skip


# ----------------------------------------------------------------------------- transforms
def resize_size(image_size: int) -> int:
    return int(round(image_size / CROP_RATIO))


CACHE_HEADROOM = 1.25


def cache_size(image_size: int, augment: bool) -> int:
    """Side of the square the decoded cache stores: the eval resize, plus headroom when augmenting.

    Random resized crops keep down to half the area (--crop_scale 0.5). Cut from a square stored at
    the eval resize they would be upscaled, i.e. blurred, to image_size: that cost 2-4 points of
    val accuracy against PIL crops from the full photo. 1.25x keeps them at >= image_size pixels;
    eval batches then crop the same centre and resize it down.
    """
    size = resize_size(image_size)
    return int(round(size * CACHE_HEADROOM)) if augment else size


def build_transforms(image_size: int, augment: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_scale: float = 0.25):
    """(train, eval) torchvision transforms; eval data is never augmented."""
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    eval_tf = T.Compose([T.Resize(resize_size(image_size)), T.CenterCrop(image_size), *normalize])
    if not augment:
        return eval_tf, eval_tf
    train_tf = T.Compose([
        T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0)),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.3, 0.3, 0.3),
        *normalize,
    ])
    return train_tf, eval_tf


def make_loader(dataset, batch_size: int, shuffle: bool, workers: int, sampler=None,
                pin_memory: bool = False, drop_last: bool = False, seed: int = 0):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, collate_fn=collate_skip_bad, pin_memory=pin_memory,
        drop_last=drop_last, persistent_workers=workers > 0, generator=generator,
    )


# ----------------------------------------------------------------------------- decoded cache
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

    paths: list[str]
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
        return DecodedCache(list(paths), images, valid, array_path)

    cache = try_open()
    if cache is not None:
        return cache
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building this very cache
        cache = try_open()
        if cache is not None:
            return cache
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


# ----------------------------------------------------------------------------- device-side batches
def augment_params(n: int, generator: torch.Generator, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3),
                   jitter: float = 0.3) -> dict[str, torch.Tensor]:
    """Random resized crop boxes (fractions of the side), flips and colour factors for a batch.

    The same distributions as RandomResizedCrop(scale, ratio), RandomHorizontalFlip and
    ColorJitter(jitter, jitter, jitter) in build_transforms.
    """
    area = torch.empty(n).uniform_(*scale, generator=generator)
    r = torch.exp(torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    return {
        "w": torch.sqrt(area * r).clamp(max=1.0),
        "h": torch.sqrt(area / r).clamp(max=1.0),
        "u": torch.rand(n, generator=generator),  # left edge, as a fraction of the free width
        "v": torch.rand(n, generator=generator),
        "flip": torch.rand(n, generator=generator) < 0.5,
        "color": torch.empty(n, 3).uniform_(1 - jitter, 1 + jitter, generator=generator),
    }


def crop_resize_flip(x: torch.Tensor, out_size: int, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-image crop box resized to out_size, mirrored where flip; uint8 stays uint8 on CPU."""
    import torch.nn.functional as F

    if x.dtype == torch.uint8 and x.device.type != "cpu":
        x = x.float()  # bilinear resize of uint8 is a CPU-only kernel
    n, _, height, width = x.shape
    out = torch.empty((n, x.shape[1], out_size, out_size), dtype=x.dtype, device=x.device)
    boxes = zip(p["w"].tolist(), p["h"].tolist(), p["u"].tolist(), p["v"].tolist(), p["flip"].tolist())
    for i, (fw, fh, fu, fv, flip) in enumerate(boxes):
        w, h = max(1, int(round(fw * width))), max(1, int(round(fh * height)))
        left, top = int(round(fu * (width - w))), int(round(fv * (height - h)))
        crop = F.interpolate(x[i : i + 1, :, top : top + h, left : left + w], size=(out_size, out_size),
                             mode="bilinear", align_corners=False, antialias=x.dtype == torch.uint8)
        out[i] = crop[0].flip(-1) if flip else crop[0]
    return out


GRAY = (0.299, 0.587, 0.114)


def color_affine(factors: torch.Tensor, channel_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast and saturation of each image as one affine colour map x -> A x + t.

    All three are linear in the pixel values (contrast pivots on the image's mean grey), so they
    compose into a 3x3 matrix and an offset per image: one pass over the pixels instead of six.
    """
    n = factors.shape[0]
    b, c, s = factors[:, 0], factors[:, 1], factors[:, 2]
    w = torch.tensor(GRAY, dtype=factors.dtype).to(factors.device, non_blocking=True)
    eye = torch.eye(3, dtype=factors.dtype, device=factors.device).expand(n, 3, 3)
    sat = s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * w.view(1, 1, 3)  # x + (1-s)(grey - x)
    A = (c * b).view(n, 1, 1) * sat
    mean_grey = (channel_means * w).sum(1)
    t = ((1 - c) * b * mean_grey).view(n, 1).expand(n, 3)  # sat maps grey to itself
    return A, t


def augment_batch(x: torch.Tensor, out_size: int, params: dict[str, torch.Tensor], mean=None, std=None) -> torch.Tensor:
    """Random resized crop, flip and colour jitter of a uint8 batch (N, 3, S, S), then normalise.

    Returns float32 (N, 3, out_size, out_size): in [0, 1] without mean/std, else normalised
    (and clipped to what [0, 1] normalises to).
    """
    scale = 1 / 255 if x.dtype == torch.uint8 else 1.0
    x = crop_resize_flip(x, out_size, params).float()  # crop boxes stay on the CPU: no syncs
    A, t = color_affine(params["color"].float().to(x.device, non_blocking=True), x.mean(dim=(2, 3)) * scale)
    A = A * scale
    return affine_normalize(x, A, t, mean, std)


def affine_normalize(x: torch.Tensor, A: torch.Tensor, t: torch.Tensor, mean, std) -> torch.Tensor:
    """y = norm(clip01(A x + t)) per image, as one batched matmul plus one clamp."""
    n, c, h, w = x.shape
    mean = tuple(mean) if mean is not None else (0.0,) * 3
    std = tuple(std) if std is not None else (1.0,) * 3
    inv_std = torch.tensor([1 / s for s in std], dtype=A.dtype).to(x.device, non_blocking=True).view(1, 3, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=A.dtype).to(x.device, non_blocking=True)
    A = A * inv_std
    t = t * inv_std.view(1, 3) - shift
    y = torch.baddbmm(t.unsqueeze(2), A, x.reshape(n, c, h * w)).view(n, c, h, w)
    lo = [-m / s for m, s in zip(mean, std)]
    hi = [(1 - m) / s for m, s in zip(mean, std)]
    for ch in range(c):  # in-place scalar clamps: much faster than a tensor-bound clamp on CPU
        y[:, ch].clamp_(lo[ch], hi[ch])
    return y


def normalize_batch(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) to normalised float32, without augmentation."""
    m = torch.tensor([v * 255 for v in mean]).to(x.device, non_blocking=True).view(1, 3, 1, 1)
    inv = torch.tensor([1 / (v * 255) for v in std]).to(x.device, non_blocking=True).view(1, 3, 1, 1)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    # On a CPU, a few images at a time stay in cache: one trip through memory instead of three.
    step = 8 if x.device.type == "cpu" else len(x)
    for i in range(0, len(x), step):
        out[i : i + step].copy_(x[i : i + step]).sub_(m).mul_(inv)
    return out


def center_crop_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    top = int(round((x.shape[-2] - size) / 2.0))
    left = int(round((x.shape[-1] - size) / 2.0))
    return x[..., top : top + size, left : left + size]


_ALLOCATOR_TUNED = False


def keep_freed_memory() -> None:
    """Let glibc reuse freed batch buffers instead of handing them back to the OS.

    A 224 px float batch is tens of MB, above glibc's mmap threshold: every batch would be a fresh
    mapping whose pages fault in one by one, which costs more than the normalisation itself on a
    CPU (measured 3x). PyTorch's CPU tuning guide suggests jemalloc/tcmalloc for the same reason;
    mallopt needs no preload. A no-op off glibc; process-wide: engine.select_device calls it once a
    run's device is the CPU.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):  # musl or another libc: keep its defaults
        pass


class DeviceLoader:
    """Batches sliced from a decoded cache, moved to the device, augmented and normalised there.

    The CPU only gathers uint8 rows (in a background thread, pinned for CUDA); crop, flip,
    colour jitter and normalisation run on whole batches on the training device.
    """

    def __init__(self, cache: DecodedCache, indices: Sequence[int], labels: Sequence[int], batch_size: int,
                 image_size: int, mean, std, device: torch.device, augment: bool, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, channels_last: bool = False,
                 sampler: EpochSampler | None = None, crop_scale: float = 0.25) -> None:
        keep = [k for k, i in enumerate(indices) if cache.valid[i]]
        self.cache = cache
        self.indices = np.asarray([indices[k] for k in keep], dtype=np.int64)
        self.labels = torch.as_tensor([labels[k] for k in keep], dtype=torch.long)
        self.skipped = len(indices) - len(keep)
        self.batch_size, self.image_size, self.device = batch_size, image_size, device
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment, self.drop_last, self.channels_last = augment, drop_last, channels_last
        self.crop_scale = crop_scale
        if sampler is not None and self.skipped:  # unreadable images drop out: re-shard what is left
            sampler = EpochSampler(len(self.indices), seed, sampler.shuffle, sampler.rank, sampler.world, sampler.pad)
        self.sampler = sampler or EpochSampler(len(self.indices), seed, shuffle)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.pin = device.type == "cuda"

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def host_batches(self):
        order = list(self.sampler)
        for start in range(0, len(order), self.batch_size):
            pos = np.asarray(order[start : start + self.batch_size], dtype=np.int64)
            if self.drop_last and len(pos) < self.batch_size:
                break
            rows = self.indices[pos]
            sort = np.argsort(rows, kind="stable")  # sequential reads from the memory map
            pos, rows = pos[sort], rows[sort]
            if self.augment:
                x = self.cache.images[rows]
            else:  # copy only the centre crop (the eval transform's, scaled to what is stored)
                stored = self.cache.images.shape[-1]
                size = max(self.image_size, int(round(self.image_size * stored / resize_size(self.image_size))))
                top = int(round((stored - size) / 2.0))
                x = self.cache.images[rows, :, top : top + size, top : top + size]
            x = torch.from_numpy(np.ascontiguousarray(x))
            y = self.labels[torch.from_numpy(pos)]
            yield (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def __iter__(self):
        import queue
        import threading

        q: queue.Queue = queue.Queue(maxsize=3)
        stop = threading.Event()

        def produce() -> None:
            try:
                for item in self.host_batches():
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as e:  # surface errors in the consumer
                q.put(e)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self.to_device(*item)
        finally:
            stop.set()

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.augment:
            params = augment_params(x.shape[0], self.generator, scale=(self.crop_scale, 1.0))
            x = augment_batch(x, self.image_size, params, self.mean, self.std)
        else:
            if x.shape[-1] != self.image_size:  # stored with headroom: the eval centre, resized down
                import torch.nn.functional as F

                x = F.interpolate(x if x.device.type == "cpu" else x.float(), size=(self.image_size,) * 2,
                                  mode="bilinear", align_corners=False, antialias=True)
            x = normalize_batch(x, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


# ----------------------------------------------------------------------------- download
def download_file(url: str, dest: Path, chunk: int = 1 << 20) -> None:
    """Fetch url into dest with a progress bar, resuming a partial dest.part via HTTP Range."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range past the end: the part file is already complete
            part.replace(dest)
            return
        raise UserError(f"download failed: {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"download failed: {url}: {getattr(e, 'reason', e)} (no internet?)") from None
    with resp:
        if have and resp.status != 206:
            have = 0  # server ignored Range: start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=dest.name
        ) as bar:
            try:
                while True:
                    block = resp.read(chunk)
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
            except (OSError, urllib.error.URLError) as e:
                raise UserError(f"download interrupted ({e}); run the same command again to resume") from None
    if total is not None and part.stat().st_size < total:
        raise UserError(
            f"download incomplete ({part.stat().st_size} of {total} bytes); run the same command again to resume"
        )
    part.replace(dest)


def check_zip_members(zf: zipfile.ZipFile, dest: Path) -> None:
    """Refuse entries that would land outside dest (../, absolute paths) or are symlinks."""
    base = dest.resolve()
    for info in zf.infolist():
        name = info.filename
        target = (base / name).resolve()
        if name.startswith(("/", "\\")) or ":" in name.split("/")[0] or not (
            target == base or base in target.parents
        ):
            raise UserError(f"refusing archive entry outside the destination: {name!r}")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise UserError(f"refusing symbolic link in archive: {name!r}")


def extract_zip(archive: Path, dest: Path) -> None:
    """Verify the archive, then extract into a temp folder and move into place (never half-extracted)."""
    tmp = dest / f".extract-{os.getpid()}"
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise UserError(f"corrupt archive {archive}: bad CRC in {bad}; delete it and download again")
            check_zip_members(zf, dest)
            shutil.rmtree(tmp, ignore_errors=True)
            zf.extractall(tmp)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"corrupt archive {archive}: {e}; delete it and download again") from None
    except OSError as e:  # a name too long, a file/folder clash, a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not extract {archive} into {dest}: {e}") from None
    for entry in tmp.iterdir():
        target = dest / entry.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        entry.replace(target)
    tmp.rmdir()


def download_dataset(dest: str | Path = "data", url: str = DATASET_URL) -> Path:
    """Download and extract nature_12K.zip into dest; a no-op when it is already there."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / ".extracted"
    archive = dest / (Path(url.split("?")[0]).name or "dataset.zip")
    if marker.exists() and marker.read_text().strip() == archive.name:
        print(f"dataset already downloaded and extracted in {dest}")
        return dest
    if not archive.exists():
        download_file(url, archive)
    print(f"extracting {archive} ...")
    extract_zip(archive, dest)
    marker.write_text(archive.name + "\n")
    print(f"done: {dest}")
    return dest


def ensure_data(data_dir: str | Path, download: bool, url: str = DATASET_URL) -> Path:
    """Resolve the data root; with download=True fetch it first when missing."""
    try:
        return resolve_data_dir(data_dir)
    except UserError:
        if not download:
            raise
    data_dir = Path(data_dir)
    dest = data_dir.parent if data_dir.name == "inaturalist_12K" else data_dir
    download_dataset(dest, url)
    return resolve_data_dir(data_dir)


# ----------------------------------------------------------------------------- stats
def dataset_stats(data_dir: str | Path, check_images: bool = True) -> dict:
    """Images per class per split, and the files that cannot be decoded."""
    ds = discover(data_dir)
    splits = {"train": ds.train}
    if ds.heldout_name:
        splits[ds.heldout_name] = ds.heldout
    counts = {name: [0] * len(ds.classes) for name in splits}
    unreadable = []
    for name, samples in splits.items():
        for path, label in samples:
            counts[name][label] += 1
            if check_images:
                try:
                    load_image(path, draft_size=64)
                except Exception as e:
                    unreadable.append((path, f"{type(e).__name__}: {e}".splitlines()[0][:200]))
    return {"root": str(ds.root), "classes": ds.classes, "counts": counts, "unreadable": unreadable}


def print_stats(stats: dict) -> None:
    splits = list(stats["counts"])
    width = max(len(c) for c in stats["classes"] + ["class"])
    print(f"{stats['root']}")
    print(f"{'class':<{width}} " + " ".join(f"{s:>8}" for s in splits))
    for i, c in enumerate(stats["classes"]):
        print(f"{c:<{width}} " + " ".join(f"{stats['counts'][s][i]:>8}" for s in splits))
    print(f"{'total':<{width}} " + " ".join(f"{sum(stats['counts'][s]):>8}" for s in splits))
    print(f"unreadable files: {len(stats['unreadable'])}")
    for path, reason in stats["unreadable"]:
        print(f"  {path}: {reason}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Download and inspect the image dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download and extract nature_12K.zip (resumable)")
    dl.add_argument("--dest", default="data", help="folder to download and extract into (default: data)")
    dl.add_argument("--url", default=DATASET_URL, help="archive URL (default: the public nature_12K.zip)")
    st = sub.add_parser("stats", help="images per class per split, and unreadable files")
    st.add_argument("--data_dir", "--data-dir", default=DEFAULT_DATA_DIR,
                    help=f"dataset root holding train/ and val/ or test/ (default: {DEFAULT_DATA_DIR})")
    st.add_argument("--json", help="also write the statistics to this JSON file")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.command == "download":
        download_dataset(args.dest, args.url)
    else:
        stats = dataset_stats(args.data_dir)
        print_stats(stats)
        if args.json:
            Path(args.json).write_text(json.dumps(stats, indent=1))


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit("interrupted; run the same command again to resume")
