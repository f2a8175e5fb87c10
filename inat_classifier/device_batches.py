"""The one batch pipeline: uint8 squares of decoded photos become augmented, normalised batches on the device.

Every photo is decoded once the same way (decoded_cache.decode_fixed: short side to
`Preprocess.decode_side`, centre square). Its rows come from the decoded cache (`CachedRows`) or,
with --cache off, from DataLoader workers that decode the same way (`DecodedRows`); `DeviceLoader`
copies them to the device on a side stream while the previous batch computes, and `model_inputs`
turns them into model inputs there: crop box -> antialiased resize -> flip -> colour -> normalise,
on whole batches. Evaluation is the same call without augmentation parameters.

A run's loaders (`image_loaders`) shard a seeded `EpochSampler` order for torchrun and skip what a
resumed epoch already trained. To add an augmentation: draw its parameters in `augment_params` and
apply them in `model_inputs`.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from inat_classifier import dataset as data
from inat_classifier import images
from inat_classifier.class_balance import balanced_draw_weights
from inat_classifier.decoded_cache import DecodedCache, choose_cache_dir, decode_fixed, open_decoded_cache
from inat_classifier.devices import Dist
from inat_classifier.presets import ASPECT_RANGE, COLOR_JITTER, Preprocess
from inat_classifier.runs import RunSetup


# ----------------------------------------------------------------------------- the order of an epoch
class EpochSampler(torch.utils.data.Sampler):
    """Shuffled order fixed by (seed, epoch), so a resumed run sees the same batches.

    `skip` drops the first samples of the epoch (resume mid-epoch); `rank`/`world` shard the
    order for DistributedDataParallel. With `balance_by` (each sample's class; --sampler balanced)
    an epoch is n draws with replacement, each class equally likely: still fixed by (seed, epoch),
    so resume and sharding work alike.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
        pad: bool = True,
        balance_by: Sequence[int] | None = None,
    ) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world, self.pad = n, seed, shuffle, rank, world, pad
        self.balance_by = None if balance_by is None else list(balance_by)
        if self.balance_by is not None and len(self.balance_by) != n:
            raise ValueError(f"balance_by has {len(self.balance_by)} labels for {n} samples")
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.balance_by is not None and self.n:
            return torch.multinomial(balanced_draw_weights(self.balance_by), self.n, True, generator=g).tolist()
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


# The columns of a batch's augmentation parameters, one row per image: the crop box in stored
# pixels, the flip (0/1), the colour jitter's 3x3 matrix (row by row) and its grey offset factor.
TOP, LEFT, HEIGHT, WIDTH, FLIP, COLOUR, GREY_OFFSET = 0, 1, 2, 3, 4, slice(5, 14), 14
PARAM_COLUMNS = 15
GRAY = (0.299, 0.587, 0.114)


def augment_params(
    n: int, side: int, generator: torch.Generator, scale=(0.25, 1.0), ratio=ASPECT_RANGE, jitter: float = COLOR_JITTER
) -> torch.Tensor:
    """(n, PARAM_COLUMNS) float32 on the host: crop boxes in a `side` px square, flips and colour maps.

    The distributions of RandomResizedCrop(scale, ratio) (without its fallback: a box wider than
    the square is clipped to it), RandomHorizontalFlip and ColorJitter(jitter, jitter, jitter).
    The host draws them (the generator's state is the run's augmentation state, saved for
    resume), computes the integer boxes in float64 and the colour maps; the device gets one copy.
    """
    area = torch.empty(n).uniform_(*scale, generator=generator)
    r = torch.exp(torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    u = torch.rand(n, generator=generator)  # left edge, as a fraction of the free width
    v = torch.rand(n, generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    factors = torch.empty(n, 3).uniform_(1 - jitter, 1 + jitter, generator=generator)
    fw, fh = torch.sqrt(area * r).clamp(max=1.0).double(), torch.sqrt(area / r).clamp(max=1.0).double()
    w, h = (fw * side).round().clamp(min=1), (fh * side).round().clamp(min=1)
    left, top = (u.double() * (side - w)).round(), (v.double() * (side - h)).round()
    boxes = torch.stack([top, left, h, w, flip.double()], 1).float()
    matrix, offset = colour_maps(factors)
    return torch.cat([boxes, matrix.reshape(n, 9), offset.unsqueeze(1)], 1)


def colour_maps(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast and saturation factors (n, 3) as one affine colour map per image:
    x -> A x + offset * mean_grey(x), with A (n, 3, 3) and offset (n,).

    All three are linear in the pixel values (contrast pivots on the image's mean grey, which
    saturation keeps), so they compose into a 3x3 matrix and a grey offset: one pass over the
    pixels instead of six, the same as torchvision's adjust_brightness, _contrast, _saturation.
    """
    n = factors.shape[0]
    b, c, s = factors[:, 0], factors[:, 1], factors[:, 2]
    grey = torch.tensor(GRAY)
    sat = s.view(n, 1, 1) * torch.eye(3) + (1 - s).view(n, 1, 1) * grey.view(1, 1, 3)  # x + (1-s)(grey - x)
    return (c * b).view(n, 1, 1) * sat, (1 - c) * b


def resize_weights(
    start: torch.Tensor, length: torch.Tensor, flip: torch.Tensor, in_side: int, out_size: int
) -> torch.Tensor:
    """Per image and axis, the (out_size, in_side) matrix of an antialiased bilinear resize of the span
    [start, start + length) of a stored axis to out_size pixels, mirrored where flip.

    start, length, flip: (N, A). The weights are F.interpolate's (antialias=True, as PIL): a triangle
    filter as wide as the scale when shrinking, normalised over the pixels inside the span. A
    flip reverses the output rows. A constant number of kernels for any batch.
    """
    out_pos, out_rev, in_pos, _ = resize_constants(out_size, in_side, start.device)
    scale = length / out_size
    support = scale.clamp(min=1.0)
    where = out_pos + flip.unsqueeze(-1) * out_rev  # output pixel centres, reversed where flipped
    centre = start.unsqueeze(-1) + scale.unsqueeze(-1) * where  # (N, A, out) in stored pixels
    w = (1 - (in_pos - centre.unsqueeze(-1)).abs_() / support[..., None, None]).clamp_(min=0)
    inside = (in_pos >= start[..., None, None]) & (in_pos < (start + length)[..., None, None])
    w = w * inside
    return w / w.sum(-1, keepdim=True)


@lru_cache(maxsize=16)
def resize_constants(out_size: int, in_side: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Output pixel centres, their mirror offsets, input pixel centres and which axis flips (x, not y),
    made once per device."""
    i = torch.arange(out_size, dtype=torch.float32, device=device)
    in_pos = torch.arange(in_side, dtype=torch.float32, device=device) + 0.5
    return i + 0.5, (out_size - 1) - 2 * i, in_pos, torch.tensor([0.0, 1.0], device=device)


def crop_resize_flip(x: torch.Tensor, out_size: int, params: torch.Tensor, batched: bool | None = None) -> torch.Tensor:
    """Each image's crop box resized to out_size (antialiased, as PIL), mirrored where flipped: float, 0-255.

    batched (default: off the CPU) is two batched matmuls with per-image resize matrices, a
    constant number of kernels for any batch. The CPU keeps a per-image loop over its uint8 resize
    kernel, several times faster there; tests pin that both give the same pixels.
    """
    if batched is None:
        batched = x.device.type != "cpu"
    if not batched:
        return crop_resize_flip_each(x, out_size, params)
    width = x.shape[-1]
    flips_x = resize_constants(out_size, width, x.device)[3]
    weights = resize_weights(
        params[:, TOP : LEFT + 1], params[:, HEIGHT : WIDTH + 1], params[:, FLIP : FLIP + 1] * flips_x, width, out_size
    )
    rows = torch.matmul(weights[:, :1], x.float())  # (N, 1, out, S) @ (N, C, S, S): the rows first
    return torch.matmul(rows, weights[:, 1:].transpose(-1, -2))  # then the columns: (N, C, out, out)


def crop_resize_flip_each(x: torch.Tensor, out_size: int, params: torch.Tensor) -> torch.Tensor:
    """crop_resize_flip image by image, with F.interpolate: the CPU's fast uint8 kernel, the reference."""
    to_float = x.dtype == torch.uint8 and x.device.type != "cpu"  # uint8 bilinear is a CPU kernel
    out = torch.empty(
        (x.shape[0], x.shape[1], out_size, out_size), dtype=torch.float32 if to_float else x.dtype, device=x.device
    )
    for i, (top, left, h, w, flip) in enumerate(params[:, :5].int().tolist()):
        box = x[i : i + 1, :, top : top + h, left : left + w]
        crop = F.interpolate(
            box.float() if to_float else box,
            size=(out_size, out_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        out[i] = crop[0].flip(-1) if flip else crop[0]
    return out.float()


@lru_cache(maxsize=16)
def colour_constants(mean: tuple, std: tuple, device: torch.device) -> dict[str, torch.Tensor]:
    """The grey weights, 1/(255 std), mean/std and the normalised range of a run, made on the device once."""

    def make(values):
        return torch.tensor(values, dtype=torch.float32, device=device)

    return {
        "grey": make(GRAY),
        "inv_std_255": make([1 / (255 * s) for s in std]),
        "shift": make([m / s for m, s in zip(mean, std, strict=True)]),
        "low": make([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1),
        "high": make([(1 - m) / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1),
    }


def colour_normalize(x: torch.Tensor, params: torch.Tensor, preprocess: Preprocess, batched: bool) -> torch.Tensor:
    """norm(clip01(A x + offset * mean_grey(x))) of 0-255 images, per image: a batched matmul and a clamp."""
    n, c, h, w = x.shape
    k = colour_constants(tuple(preprocess.mean), tuple(preprocess.std), x.device)
    A = params[:, COLOUR].view(n, 3, 3) * k["inv_std_255"].view(1, 3, 1)
    grey = x.mean(dim=(2, 3)) @ k["grey"]  # each image's mean grey, 0-255
    t = (params[:, GREY_OFFSET] * grey).unsqueeze(1) * k["inv_std_255"] - k["shift"]
    y = torch.baddbmm(t.unsqueeze(2), A, x.reshape(n, c, h * w)).view(n, c, h, w)
    if batched:  # one kernel
        return y.clamp_(k["low"], k["high"])
    for ch, (m, s) in enumerate(zip(preprocess.mean, preprocess.std, strict=True)):  # scalar clamps: faster on a CPU
        y[:, ch].clamp_(-m / s, (1 - m) / s)
    return y


def normalize_batch(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(N, 3, H, W) in 0-255 (uint8 or float) to normalised float32, without augmentation."""
    k = colour_constants(tuple(mean), tuple(std), x.device)
    scale, shift = k["inv_std_255"].view(1, 3, 1, 1), -k["shift"].view(1, 3, 1, 1)
    if x.device.type != "cpu":
        return torch.addcmul(shift, x.float(), scale)
    out = torch.empty(x.shape, dtype=torch.float32)
    # On a CPU, a few images at a time stay in cache: one trip through memory instead of three.
    for i in range(0, len(x), 8):
        out[i : i + 8].copy_(x[i : i + 8]).mul_(scale).add_(shift)
    return out


def eval_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """The eval centre (N, 3, S, S), resized to size when stored with headroom (the same box for all).

    In float on every device (not the CPU's uint8 kernel, which rounds): the same inputs everywhere.
    Rows already at size come back as they are.
    """
    if x.shape[-1] == size:
        return x
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def model_inputs(
    x: torch.Tensor, preprocess: Preprocess, params: torch.Tensor | None = None, batched: bool | None = None
) -> torch.Tensor:
    """uint8 rows (N, 3, S, S) on the device -> normalised float32 (N, 3, image_size, image_size).

    With params (augment_params, on the device): the random crop, flip and colour jitter. Without:
    evaluation, the rows being the eval region (Preprocess.eval_region), resized if stored larger.
    batched (default: off the CPU): the formulation in a constant number of kernels (crop_resize_flip).
    """
    size = preprocess.image_size
    if params is None:
        return normalize_batch(eval_resize(x, size), preprocess.mean, preprocess.std)
    if batched is None:
        batched = x.device.type != "cpu"
    return colour_normalize(crop_resize_flip(x, size, params, batched), params, preprocess, batched)


# ----------------------------------------------------------------------------- where rows come from
class CachedRows:
    """Rows gathered from a decoded cache, in a background thread, into (pinned) host memory."""

    def __init__(self, cache: DecodedCache, indices: Sequence[int]) -> None:
        self.kept = [k for k, i in enumerate(indices) if cache.valid[i]]  # unreadable photos drop out here
        self.cache, self.rows = cache, np.asarray([indices[k] for k in self.kept], dtype=np.int64)

    @property
    def side(self) -> int:
        return self.cache.images.shape[-1]

    def host_batches(
        self, batches: Iterator[np.ndarray], region: tuple[int, int] | None, pin: bool
    ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        def gather(pos: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
            images, rows = self.cache.images, self.rows[pos]
            if region is None:
                out = torch.empty((len(pos), *images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
                np.take(images, rows, axis=0, out=out.numpy(), mode="clip")  # one copy (unbuffered: not "raise")
                return out, pos
            top, size = region  # only the eval centre crop (np.take would copy the whole strided view first)
            centre = torch.from_numpy(images[rows, :, top : top + size, top : top + size])
            return (centre.pin_memory() if pin else centre), pos

        return in_background(gather(pos) for pos in batches)


class DecodedRows:
    """Rows decoded from the photo files by DataLoader workers each epoch (--cache off), as the cache decodes."""

    def __init__(self, paths: Sequence[str], side: int, workers: int) -> None:
        self.paths, self.side, self.workers = list(paths), side, workers
        self.kept = list(range(len(self.paths)))
        self.order: list[np.ndarray] = []  # this epoch's batches, read by the loader's batch sampler
        self.loader: torch.utils.data.DataLoader | None = None

    def __iter__(self) -> Iterator[np.ndarray]:  # the batch sampler of the (persistent) worker loader
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def host_batches(
        self, batches: Iterator[np.ndarray], region: tuple[int, int] | None, pin: bool
    ) -> Iterator[tuple[torch.Tensor | None, np.ndarray]]:
        self.order = list(batches)
        if self.loader is None:  # the workers live as long as the loader: no start-up every epoch
            self.loader = torch.utils.data.DataLoader(
                _DecodeRows(self.paths, self.side, region),
                batch_sampler=self,
                num_workers=self.workers,
                collate_fn=_collate_rows,
                pin_memory=pin,
                persistent_workers=self.workers > 0,
                generator=torch.Generator(),  # its own seed: the run's random stream stays the cache's
            )
        for rows, pos, bad in self.loader:
            for path, reason in bad:
                images.BAD_IMAGES.report(path, reason)
            yield rows, pos


class _DecodeRows(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], side: int, region: tuple[int, int] | None) -> None:
        self.paths, self.side, self.region = paths, side, region

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            rows = decode_fixed(self.paths[i], self.side)
        except Exception as e:  # any decode failure: skip the file, never end the run
            return i, None, (self.paths[i], f"{type(e).__name__}: {e}".splitlines()[0][:200])
        if self.region is not None:
            top, size = self.region
            rows = rows[:, top : top + size, top : top + size]
        return i, rows, None


def _collate_rows(items: list) -> tuple[torch.Tensor | None, np.ndarray, list]:
    good = [(i, rows) for i, rows, _ in items if rows is not None]
    bad = [why for _, rows, why in items if rows is None]
    pos = np.asarray([i for i, _ in good], dtype=np.int64)
    return (torch.from_numpy(np.stack([r for _, r in good])) if good else None), pos, bad


def in_background(items: Iterator, depth: int = 3) -> Iterator:
    """The items of a generator, produced by a thread `depth` ahead; its errors surface here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

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
            for item in items:
                if not offer(item):
                    return
            offer(done)
        except BaseException as e:  # surface errors in the consumer
            offer(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Joined, not abandoned: a daemon thread still inside torch when the process exits (a stop
        # mid-epoch, then sys.exit) aborts it with "terminate called without an active exception".
        thread.join(timeout=60)


class DeviceLoader:
    """Batches of rows (CachedRows or DecodedRows), moved to the device and made model inputs there.

    Batches follow the sampler's order (each batch's rows sorted, for sequential reads of the
    cache). On CUDA the next batch is copied on a side stream from pinned memory while the current
    one computes; the augmentation parameters are drawn when a batch is consumed, so the
    generator's state is always that of the batches trained on (exact resume).
    """

    def __init__(
        self,
        source: CachedRows | DecodedRows,
        labels: Sequence[int],
        batch_size: int,
        preprocess: Preprocess,
        device: torch.device,
        augment: bool,
        crop_scale: float = 0.25,
        sampler: EpochSampler | None = None,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.source = source
        self.labels = torch.as_tensor([labels[k] for k in source.kept], dtype=torch.long)
        self.skipped = len(labels) - len(source.kept)
        self.batch_size, self.preprocess, self.device = batch_size, preprocess, device
        self.augment, self.crop_scale = augment, crop_scale
        self.drop_last, self.channels_last = drop_last, channels_last
        n = len(source.kept)
        if sampler is not None and self.skipped:  # unreadable images drop out: re-shard what is left
            balance_by = None if sampler.balance_by is None else [sampler.balance_by[k] for k in source.kept]
            sampler = EpochSampler(n, seed, sampler.shuffle, sampler.rank, sampler.world, sampler.pad, balance_by)
        self.sampler = sampler or EpochSampler(n, seed, shuffle=False)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.batched_resize: bool | None = None  # crop_resize_flip's choice; True shows the CUDA path on a CPU

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def position_batches(self) -> Iterator[np.ndarray]:
        """Positions (into source.kept) of each batch, in sampler order, each batch sorted."""
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        for start in range(0, len(order), self.batch_size):
            pos = order[start : start + self.batch_size]
            if self.drop_last and len(pos) < self.batch_size:
                break
            yield np.sort(pos)  # sequential reads from the memory map; the labels follow

    def host_batches(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
        """(uint8 rows, labels) of each batch on the host; rows None where none of a batch could be read."""
        side = self.source.side
        region = None if self.augment else self.preprocess.eval_region(side)
        if region == (0, side):
            region = None
        pin = self.device.type == "cuda"
        for rows, pos in self.source.host_batches(self.position_batches(), region, pin):
            labels = self.labels[torch.from_numpy(pos)]
            yield rows, (labels.pin_memory() if pin else labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
        if self.device.type != "cuda":
            for x, y in self.host_batches():
                yield self.finish_batch(x, y)
            return
        copies = torch.cuda.Stream(self.device)
        ahead = None
        for x, y in self.host_batches():
            with torch.cuda.stream(copies):  # overlaps the step of the batch before
                moved = (
                    None if x is None else x.to(self.device, non_blocking=True),
                    y.to(self.device, non_blocking=True),
                )
                ready = torch.cuda.Event()
                ready.record(copies)
            if ahead is not None:
                yield self.finish_copied(*ahead)
            ahead = (moved, ready)
        if ahead is not None:
            yield self.finish_copied(*ahead)

    def finish_copied(self, moved: tuple, ready: torch.cuda.Event) -> tuple:
        """A batch copied on the side stream, made inputs on the compute stream once its copy is done."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(ready)
        for t in moved:
            if t is not None:
                t.record_stream(compute)  # its memory is not reused before the step that reads it
        return self.finish_batch(*moved)

    def finish_batch(self, x: torch.Tensor | None, y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Rows on (or moved to) the device as model inputs; (None, None) for a batch with no readable image."""
        if x is None:
            return None, None
        params = self.draw_params(x.shape[0], x.shape[-1]) if self.augment else None
        return self.device_inputs(x, y, params)

    def draw_params(self, n: int, side: int) -> torch.Tensor:
        """The batch's augmentation parameters, drawn on the host from the loader's generator."""
        return augment_params(n, side, self.generator, scale=(self.crop_scale, 1.0))

    def device_inputs(
        self, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What runs on the device for a batch: rows, labels and parameters there, then model_inputs."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if params is not None:
            params = params.to(self.device, non_blocking=True)
        x = model_inputs(x, self.preprocess, params, self.batched_resize)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


# ----------------------------------------------------------------------------- a run's loaders
# The decoded cache of a run and where each (path, label) sample sits in it.
CachedImages = tuple[DecodedCache, dict]


def stored_preprocess(setup: RunSetup, preprocess: Preprocess) -> Preprocess:
    """preprocess with the side every photo of the run is stored at (recorded in its checkpoints)."""
    args = setup.args
    paths = [p for p, _ in setup.train_samples + setup.val_samples]
    largest = max(setup.photo_sides[p] for p in paths) if args.augment else 0
    return preprocess.with_stored_side(args.augment, args.crop_scale, largest)


def open_cache(setup: RunSetup, preprocess: Preprocess) -> CachedImages | None:
    """The decoded-image cache over all of train/ (both sides of any split), or None with --cache off."""
    args = setup.args
    if args.cache == "off":
        return None
    cache_dir, note = choose_cache_dir(args.cache)
    if cache_dir is None:
        if setup.dist.main:
            print(note, file=sys.stderr)
        return None
    samples = sorted(set(setup.train_samples) | set(setup.val_samples))
    paths = [p for p, _ in samples]
    cache = open_decoded_cache(paths, preprocess.decode_side, cache_dir, args.workers)
    # Files whose header reads but whose pixels do not (truncated JPEGs) are known only now.
    unreadable = {paths[i] for i in np.flatnonzero(~cache.valid)}
    data.check_trainable(setup.classes, setup.train_samples, unreadable, setup.root / "train")
    return cache, {s: i for i, s in enumerate(samples)}


def make_image_loader(
    setup: RunSetup,
    samples: list,
    preprocess: Preprocess,
    device: torch.device,
    train: bool,
    cached: CachedImages | None,
    shard: bool = True,
) -> Iterable:
    """Batches of one split: rows from the decoded cache, or decoded by --workers processes without one.

    shard=False gives every process all the samples (e.g. to compute a complete feature cache).
    """
    args, dist = setup.args, (setup.dist if shard else Dist())
    augment = train and args.augment
    batch = setup.rank_batch_size if shard else args.batch_size
    drop_last = train and len(samples) > args.batch_size
    # Training shards are padded to equal length (as DistributedSampler); validation shards are
    # not, so every validation image is counted exactly once over all processes.
    balance_by = [label for _, label in samples] if train and getattr(args, "sampler", "random") == "balanced" else None
    sampler = EpochSampler(
        len(samples), args.seed, shuffle=train, rank=dist.rank, world=dist.world, pad=train, balance_by=balance_by
    )
    if cached is not None:
        cache, pos = cached
        source = CachedRows(cache, [pos[s] for s in samples])
    else:
        source = DecodedRows([path for path, _ in samples], preprocess.decode_side, args.workers)
    return DeviceLoader(
        source,
        [label for _, label in samples],
        batch,
        preprocess,
        device,
        augment=augment,
        crop_scale=args.crop_scale,
        sampler=sampler,
        seed=args.seed,
        drop_last=drop_last,
        channels_last=getattr(args, "channels_last", False),
    )


def image_loaders(setup: RunSetup, preprocess: Preprocess, device: torch.device) -> tuple[Iterable, Iterable]:
    """Train and val loaders (train shuffled, and augmented with --augment)."""
    cached = open_cache(setup, preprocess)
    return (
        make_image_loader(setup, setup.train_samples, preprocess, device, True, cached),
        make_image_loader(setup, setup.val_samples, preprocess, device, False, cached),
    )
