"""The device-side batch pipeline: uint8 rows of the decoded cache become augmented, normalised batches on the device.

Crop, flip, colour jitter and normalisation run on whole batches where the model runs; the host
only gathers rows. The distributions are those of `Preprocess.train_transform` (the PIL path).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from inat_classifier.decoded_cache import DecodedCache
from inat_classifier.presets import ASPECT_RANGE, COLOR_JITTER, Preprocess
from inat_classifier.sampler import EpochSampler


def augment_params(n: int, generator: torch.Generator, scale=(0.25, 1.0), ratio=ASPECT_RANGE,
                   jitter: float = COLOR_JITTER) -> dict[str, torch.Tensor]:
    """Random resized crop boxes (fractions of the side), flips and colour factors for a batch.

    The same distributions as RandomResizedCrop(scale, ratio), RandomHorizontalFlip and
    ColorJitter(jitter, jitter, jitter) in Preprocess.train_transform.
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
    """Per-image crop box resized to out_size, mirrored where flip; uint8 stays uint8 on CPU.

    Always antialiased, on every device, as PIL resizes: the same input gives the same pixels
    on CPU and GPU (within the CPU path's rounding to uint8).
    """
    # Bilinear resize of uint8 is a CPU-only kernel: elsewhere each crop turns float on its own, so
    # the stored batch never exists as float (0.8 GB at batch 256 and 518 px).
    to_float = x.dtype == torch.uint8 and x.device.type != "cpu"
    n, _, height, width = x.shape
    out = torch.empty((n, x.shape[1], out_size, out_size), dtype=torch.float32 if to_float else x.dtype,
                      device=x.device)
    boxes = zip(p["w"].tolist(), p["h"].tolist(), p["u"].tolist(), p["v"].tolist(), p["flip"].tolist())
    for i, (fw, fh, fu, fv, flip) in enumerate(boxes):
        w, h = max(1, int(round(fw * width))), max(1, int(round(fh * height)))
        left, top = int(round(fu * (width - w))), int(round(fv * (height - h)))
        box = x[i : i + 1, :, top : top + h, left : left + w]
        crop = F.interpolate(box.float() if to_float else box, size=(out_size, out_size),
                             mode="bilinear", align_corners=False, antialias=True)
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


class DeviceLoader:
    """Batches sliced from a decoded cache, moved to the device, augmented and normalised there.

    The CPU only gathers uint8 rows (in a background thread, pinned for CUDA); crop, flip,
    colour jitter and normalisation run on whole batches on the training device.
    """

    def __init__(self, cache: DecodedCache, indices: Sequence[int], labels: Sequence[int], batch_size: int,
                 preprocess: Preprocess, device: torch.device, augment: bool, crop_scale: float = 0.25,
                 sampler: EpochSampler | None = None, seed: int = 0, drop_last: bool = False,
                 channels_last: bool = False) -> None:
        keep = [k for k, i in enumerate(indices) if cache.valid[i]]
        self.cache = cache
        self.indices = np.asarray([indices[k] for k in keep], dtype=np.int64)
        self.labels = torch.as_tensor([labels[k] for k in keep], dtype=torch.long)
        self.skipped = len(indices) - len(keep)
        self.batch_size, self.preprocess, self.device = batch_size, preprocess, device
        self.augment, self.crop_scale = augment, crop_scale
        self.drop_last, self.channels_last = drop_last, channels_last
        if sampler is not None and self.skipped:  # unreadable images drop out: re-shard what is left
            sampler = EpochSampler(len(self.indices), seed, sampler.shuffle, sampler.rank, sampler.world, sampler.pad)
        self.sampler = sampler or EpochSampler(len(self.indices), seed, shuffle=False)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.pin = device.type == "cuda"

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 rows, labels) of each batch, gathered on the host in sampler order."""
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
                top, size = self.preprocess.eval_region(self.cache.images.shape[-1])
                x = self.cache.images[rows, :, top : top + size, top : top + size]
            x = torch.from_numpy(np.ascontiguousarray(x))
            y = self.labels[torch.from_numpy(pos)]
            yield (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def __iter__(self):
        import queue
        import threading

        q: queue.Queue = queue.Queue(maxsize=3)
        stop = threading.Event()

        def offer(item) -> bool:
            """Queue item unless the consumer has stopped (then never block: it joins this thread)."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self.host_batches():
                    if not offer(item):
                        return
                offer(None)
            except BaseException as e:  # surface errors in the consumer
                offer(e)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self.finish_batch(*item)
        finally:
            stop.set()
            # Joined, not abandoned: a daemon thread still inside torch when the process exits (a stop
            # mid-epoch, then sys.exit) aborts it with "terminate called without an active exception".
            thread.join(timeout=60)

    def finish_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move gathered uint8 rows to the device and turn them into model inputs there."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        pre = self.preprocess
        if self.augment:
            params = augment_params(x.shape[0], self.generator, scale=(self.crop_scale, 1.0))
            x = augment_batch(x, pre.image_size, params, pre.mean, pre.std)
        else:
            if x.shape[-1] != pre.image_size:  # stored with headroom: the eval centre, resized down
                x = F.interpolate(x if x.device.type == "cpu" else x.float(), size=(pre.image_size,) * 2,
                                  mode="bilinear", align_corners=False, antialias=True)
            x = normalize_batch(x, pre.mean, pre.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y
