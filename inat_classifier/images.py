"""Reading photos with PIL: robust decoding to RGB, refusing special files, bad-file reports."""

from __future__ import annotations

import os
import stat
import sys
import warnings

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


FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


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
                f"over twice the {limit / 1e6:.0f}-megapixel limit (PIL's Image.MAX_IMAGE_PIXELS)"
            ) from None
    w, h = img.size
    if limit and w * h > limit:
        img.close()
        raise Image.DecompressionBombError(
            f"{w}x{h} is {w * h / 1e6:.0f} megapixels, over the "
            f"{limit / 1e6:.0f}-megapixel limit (PIL's Image.MAX_IMAGE_PIXELS)"
        )
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


def batch_to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, y) of any loader's batch on the device (a no-op for device_batches.DeviceLoader's).

    None when every image of the batch was unreadable (DeviceLoader yields (None, None) then).
    """
    x, y = batch
    if x is None:
        return None
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
