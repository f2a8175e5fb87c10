"""Reading photos with PIL: robust decoding to RGB, the per-epoch PIL dataset and loader, bad-file reports."""
from __future__ import annotations

import os
import stat
import sys
import warnings
from typing import Callable, Sequence

import torch
from PIL import Image, ImageFile, ImageOps

# Keep PIL strict: a truncated file must raise (and be skipped), not decode as grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


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


FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def special_kind(mode: int) -> str | None:
    """What a file that is not a regular file is ("a FIFO (named pipe)", ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in FILE_KINDS if test(mode)), "a special file")


def open_image(path: str) -> Image.Image:
    """Image.open of a regular file (through links) whose header is within PIL's pixel limit.

    A FIFO would block open() forever and a device never ends, so they are refused before opening;
    a photo over Image.MAX_IMAGE_PIXELS is refused from its header, the same on every path.
    """
    kind = special_kind(os.stat(path).st_mode)
    if kind:
        raise OSError(f"{kind}, not a regular file; never opened")
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, with the size
        try:
            img = Image.open(path)
        except Image.DecompressionBombError:
            raise Image.DecompressionBombError(
                f"over twice the {limit / 1e6:.0f}-megapixel limit (PIL's Image.MAX_IMAGE_PIXELS)") from None
    w, h = img.size
    if limit and w * h > limit:
        img.close()
        raise Image.DecompressionBombError(f"{w}x{h} is {w * h / 1e6:.0f} megapixels, over the "
                                           f"{limit / 1e6:.0f}-megapixel limit (PIL's Image.MAX_IMAGE_PIXELS)")
    return img


def load_image(path: str, draft_size: int | None = None) -> Image.Image:
    """Decode one file to RGB. Raises on special, unreadable, truncated or over-limit files."""
    with open_image(path) as img:
        if draft_size and img.format == "JPEG":
            # DCT-domain downscaling: decode at 1/2..1/8 size when the target is much smaller.
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return to_rgb(img)


def photo_short_side(path: str) -> int:
    """The short side of a photo in pixels, read from its header alone (0 when unreadable or over the limit)."""
    try:
        with open_image(path) as img:
            return min(img.size)
    except Exception:  # unreadable files are reported when they are decoded
        return 0


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
    """(path, label) samples decoded with PIL; an unreadable file yields ("__bad__", path, reason),
    which collate_skip_bad drops and hands to the main process to report."""

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


def collate_skip_bad(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
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


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, sampler=None,
                pin_memory: bool = False, drop_last: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader of PIL-decoded samples in sampler order (file order without one); bad files are skipped."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler,
        num_workers=workers, collate_fn=collate_skip_bad, pin_memory=pin_memory,
        drop_last=drop_last, persistent_workers=workers > 0, generator=generator,
    )


def batch_to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, y) of any loader's batch on the device; reports the unreadable files a PIL batch skipped.

    None when every image of the batch was unreadable.
    """
    if len(batch) == 3:
        x, y, bad = batch
        for path, reason in bad:
            BAD_IMAGES.report(path, reason)
    else:
        x, y = batch
    if x is None:
        return None
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
