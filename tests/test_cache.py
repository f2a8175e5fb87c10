"""The decoded-image cache and device-side batches: same pixels, rebuilt on change, safe after a crash."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, IMAGENETTE, make_dataset
from inat_classifier.decoded_cache import decode_fixed, open_decoded_cache
from inat_classifier.device_batches import (
    FLIP,
    HEIGHT,
    PARAM_COLUMNS,
    WIDTH,
    CachedRows,
    DeviceLoader,
    augment_params,
    colour_maps,
    crop_resize_flip,
    model_inputs,
)
from inat_classifier.presets import IMAGENET_MEAN, IMAGENET_STD, Preprocess


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", CLASSES[:2], n_train=4, n_val=1, size=40)


def train_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "train").rglob("*") if p.is_file())


def test_cache_holds_the_short_side_resized_centre_of_every_file(folder, tmp_path):
    """Small PNG/JPEG files (no draft mode): the cache rows are torchvision's Resize + CenterCrop, exactly."""
    from torchvision import transforms as T

    paths = train_paths(folder)
    cache = open_decoded_cache(paths, 36, tmp_path / "cache")
    assert cache.images.shape == (len(paths), 3, 36, 36) and cache.images.dtype == np.uint8
    for i, p in enumerate(paths):
        ref = T.PILToTensor()(T.CenterCrop(36)(T.Resize(36)(Image.open(p).convert("RGB"))))
        assert torch.equal(torch.from_numpy(np.array(cache.images[i])), ref), p


def test_decode_fixed_matches_the_eval_transform_resize_and_crop(tmp_path):
    from torchvision import transforms as T

    path = tmp_path / "wide.png"  # PNG: no JPEG draft mode, so the pixels must match exactly
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)).save(path)
    ours = decode_fixed(str(path), 32)
    ref = np.asarray(T.CenterCrop(32)(T.Resize(32)(Image.open(path).convert("RGB")))).transpose(2, 0, 1)
    assert np.array_equal(ours, ref)


def test_cache_is_reused_and_rebuilt_when_files_change(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    paths = train_paths(folder)
    first = open_decoded_cache(paths, 32, cache_dir)
    assert open_decoded_cache(paths, 32, cache_dir).path == first.path  # reused
    # change a file's content (and mtime)
    Image.new("RGB", (40, 40), (255, 255, 255)).save(paths[0])
    os.utime(paths[0], ns=(1, 10**18))
    changed = open_decoded_cache(paths, 32, cache_dir)
    assert changed.path != first.path and changed.images[0].min() == 255
    # add a file, then delete one
    extra = Path(paths[0]).with_name("extra.png")
    Image.new("RGB", (40, 40), (0, 0, 0)).save(extra)
    added = open_decoded_cache(sorted(paths + [str(extra)]), 32, cache_dir)
    assert added.images.shape[0] == len(paths) + 1 and added.path not in (first.path, changed.path)
    os.remove(paths[1])
    removed = open_decoded_cache([p for p in paths if p != paths[1]], 32, cache_dir)
    assert removed.images.shape[0] == len(paths) - 1


def test_half_written_cache_is_detected_and_rebuilt(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    paths = train_paths(folder)
    good = open_decoded_cache(paths, 32, cache_dir)
    reference = np.array(good.images)
    key_json = good.path.with_suffix(".json")
    # a build killed before its marker was written: the array exists, the .json does not
    key_json.unlink()
    with open(good.path, "r+b") as f:
        f.truncate(good.path.stat().st_size // 2)
    rebuilt = open_decoded_cache(paths, 32, cache_dir)
    assert np.array_equal(np.array(rebuilt.images), reference)
    # a truncated array under a valid marker is not trusted either
    with open(rebuilt.path, "r+b") as f:
        f.truncate(rebuilt.path.stat().st_size // 2)
    again = open_decoded_cache(paths, 32, cache_dir)
    assert np.array_equal(np.array(again.images), reference)
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def batch_u8(n: int = 6, size: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_device_augmentation_keeps_shape_dtype_and_range_and_is_seeded():
    x = batch_u8()
    plain = Preprocess(32, 36, (0.0,) * 3, (1.0,) * 3)  # no normalisation: pixels in [0, 1]
    params = augment_params(6, 40, torch.Generator().manual_seed(1))
    out = model_inputs(x, plain, params)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    again = model_inputs(x, plain, augment_params(6, 40, torch.Generator().manual_seed(1)))
    other = model_inputs(x, plain, augment_params(6, 40, torch.Generator().manual_seed(2)))
    assert torch.equal(out, again) and not torch.equal(out, other)
    normed = model_inputs(x, Preprocess(32, 36), params)
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    assert normed.min() >= lo - 1e-5 and normed.max() <= hi + 1e-5


def test_colour_jitter_as_one_affine_map_equals_torchvision():
    from torchvision.transforms import functional as TF

    img = torch.rand(2, 3, 16, 16) * 0.5 + 0.25  # mid-range: no clipping in between
    factors = torch.tensor([[1.2, 0.8, 1.1], [0.8, 1.25, 0.75]])
    matrix, offset = colour_maps(factors)
    params = torch.cat([torch.tensor([[0.0, 0.0, 16, 16, 0]] * 2), matrix.reshape(2, 9), offset[:, None]], 1)
    assert params.shape[1] == PARAM_COLUMNS
    plain = Preprocess(16, 16, (0.0,) * 3, (1.0,) * 3)
    for batched in (False, True):  # the whole square at its own size: the resize is the identity
        ours = model_inputs(img * 255, plain, params, batched=batched)
        for i, (b, c, s) in enumerate(factors.tolist()):
            ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img[i], b), c), s)
            assert torch.allclose(ours[i], ref, atol=1e-5)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = int(round((x.shape[-2] - size) / 2.0)), int(round((x.shape[-1] - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def torchvision_eval(paths, pre: Preprocess) -> torch.Tensor:
    """The reference eval inputs: torchvision's own transforms on the full-resolution PIL images."""
    from torchvision import transforms as T

    tf = T.Compose(
        [T.Resize(pre.resize_size), T.CenterCrop(pre.image_size), T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    )
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])


def test_eval_batches_are_never_augmented(folder, tmp_path):
    """Every epoch, eval batches equal torchvision's eval transform of the files (no draft at 40 px)."""
    paths = train_paths(folder)
    cache = open_decoded_cache(paths, 36, tmp_path / "cache")
    pre = Preprocess(32, 36)
    loader = DeviceLoader(
        CachedRows(cache, list(range(len(paths)))), [0] * len(paths), 4, pre, torch.device("cpu"), augment=False
    )
    expected = torchvision_eval(paths, pre)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        got = torch.cat([x for x, _ in loader])
        assert torch.allclose(got, expected, atol=1e-5)


def test_crop_scale_bounds_the_crop_area():
    g = torch.Generator().manual_seed(0)
    area = {
        scale: (lambda p: p[:, HEIGHT] * p[:, WIDTH] / 100**2)(augment_params(2000, 100, g, scale=(scale, 1.0)))
        for scale in (0.8, 0.1)
    }
    # w and h are clamped to the full side, so the kept area can only shrink below the drawn one.
    assert area[0.8].min() > 0.55 and area[0.1].min() < 0.15 and area[0.1].max() <= 1.0


def test_device_loader_draws_crops_at_its_crop_scale(folder, tmp_path):
    paths = train_paths(folder)
    cache = open_decoded_cache(paths, 36, tmp_path / "cache")

    def batch(scale: float) -> torch.Tensor:
        loader = DeviceLoader(
            CachedRows(cache, list(range(len(paths)))),
            [0] * len(paths),
            len(paths),
            Preprocess(32, 36),
            torch.device("cpu"),
            augment=True,
            seed=3,
            crop_scale=scale,
        )
        return next(iter(loader))[0]

    assert torch.equal(batch(0.5), batch(0.5)) and not torch.equal(batch(0.5), batch(0.3))


def test_stored_side_fits_the_smallest_crop_but_not_more_than_the_photos_have():
    """Hand values at 64 px: the narrowest crop of area `scale` (aspect 3/4) keeps sqrt(scale*3/4) of the side,
    so the side is ceil(64 / that): 262 at 0.08 (0.2449), 148 at 0.25 (0.4330), 105 at 0.5 (0.6124), 74 at 1.0
    (0.8660), never below the eval resize 73 (= round(64 / 0.875))."""
    pre = Preprocess.for_size(64)
    assert pre.resize_size == 73 and pre.stored_side_for(False, 0.5, 10_000) == 73
    assert [pre.stored_side_for(True, s, 10_000) for s in (0.08, 0.25, 0.5, 1.0)] == [262, 148, 105, 74]
    assert pre.stored_side_for(True, 0.08, 150) == 150  # no bigger than the largest photo
    assert pre.stored_side_for(True, 0.08, 50) == 73  # but always enough for the eval resize
    assert Preprocess.for_size(224).stored_side_for(True, 0.25, 1200) == 518  # ceil(224 / 0.4330)
    assert pre.decode_side == 73 and pre.with_stored_side(True, 0.5, 10_000).decode_side == 105


# ----------------------------------------------------------------------------- cached crop vs PIL crop
def camera_photo(path: Path, size=(1600, 1200)) -> Path:
    """A camera-size JPEG with detail at every scale (smooth gradients plus fine texture)."""
    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 37.0) * np.cos(yy / 23.0)], -1) * 180
    texture = rng.integers(0, 75, (h // 4, w // 4, 3)).repeat(4, 0).repeat(4, 1)  # 4-px grain
    Image.fromarray((base + texture).clip(0, 255).astype(np.uint8)).save(path, quality=95)
    return path


def pil_crop(path: Path, box: tuple[float, float, float, float], stored: int, out: int) -> torch.Tensor:
    """The reference: the pixels of the box crop_resize_flip cuts from a `stored` px square, taken from
    the full-resolution photo instead and resized by PIL (antialiased)."""
    from torchvision.transforms import functional as TF

    img = Image.open(path).convert("RGB")
    side = min(img.size)
    k, x0, y0 = side / stored, (img.size[0] - side) / 2, (img.size[1] - side) / 2
    fw, fh, fu, fv = box
    w, h = max(1, round(fw * stored)), max(1, round(fh * stored))  # as crop_resize_flip rounds
    left, top = round(fu * (stored - w)), round(fv * (stored - h))
    photo_box = (x0 + left * k, y0 + top * k, x0 + (left + w) * k, y0 + (top + h) * k)
    return TF.pil_to_tensor(img.resize((out, out), Image.BILINEAR, box=photo_box)).float() / 255


def box_params(box: tuple[float, float, float, float], stored: int, flip: bool = False) -> torch.Tensor:
    """augment_params' row for a box given as fractions (width, height, left, top), rounded as it rounds."""
    fw, fh, fu, fv = box
    w, h = max(1, round(fw * stored)), max(1, round(fh * stored))
    identity = [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0, 0]  # no colour change
    return torch.tensor([[round(fv * (stored - h)), round(fu * (stored - w)), h, w, float(flip), *identity]])


def cached_crop(x: torch.Tensor, box: tuple[float, float, float, float], out: int) -> torch.Tensor:
    return crop_resize_flip(x, out, box_params(box, x.shape[-1])) / 255


# The smallest crops Part B's default (--crop_scale 0.25) draws: a quarter of the area, at both
# extreme aspect ratios, in the corners and the middle.
SMALL_BOXES = [
    (math.sqrt(0.25 * r), math.sqrt(0.25 / r), u, v)
    for r in (3 / 4, 1.0, 4 / 3)
    for u, v in ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0))
]


def test_cached_random_crops_have_the_detail_of_pil_crops_of_the_photo(tmp_path):
    photo = camera_photo(tmp_path / "camera.jpg")
    pre = Preprocess.for_size(224)
    side = pre.stored_side_for(True, 0.25, 1200)
    cache = open_decoded_cache([str(photo)], side, tmp_path / "cache")
    x = torch.from_numpy(np.array(cache.images))
    for box in SMALL_BOXES:
        ref = pil_crop(photo, box, side, 224)
        ours = cached_crop(x, box, 224)
        # Measured 0.006 here; crops upscaled from the old 320 px square (139-185 px wide) are 0.02 off.
        assert (ours - ref).abs().mean() < 0.01, box


def drafted(path: Path, size: int) -> Image.Image:
    img = Image.open(path)
    img.draft("RGB", (size, size))  # what decode_fixed's JPEG draft mode decodes (1/2 .. 1/8 scale)
    return img.convert("RGB")


@pytest.mark.parametrize("augment_side", [False, True])
def test_cached_eval_batches_match_torchvision_on_camera_jpegs(tmp_path, augment_side):
    """1600x1200 and 1200x1600 JPEGs (draft mode): eval batches from the cache vs torchvision's eval transform
    of the full photo. Tolerances come from torchvision alone: the eval-size cache may be off by no more than
    draft mode itself costs (x1.25); the augmentation-size cache (518 px, centre resized again) by less than
    half of what a one-pixel misalignment of the centre crop costs."""
    from torchvision import transforms as T

    paths = [str(camera_photo(tmp_path / "wide.jpg")), str(camera_photo(tmp_path / "tall.jpg", (1200, 1600)))]
    pre = Preprocess.for_size(224)
    side = pre.stored_side_for(augment_side, 0.25, 1200)
    assert side == (518 if augment_side else 256)
    cache = open_decoded_cache(paths, side, tmp_path / "cache")
    loader = DeviceLoader(CachedRows(cache, [0, 1]), [0, 1], 2, pre, torch.device("cpu"), augment=False)
    got = next(iter(loader))[0]
    ref = torchvision_eval(paths, pre)
    err = (got - ref).abs().mean().item()
    if not augment_side:
        tf = T.Compose([T.Resize(pre.resize_size), T.CenterCrop(224), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
        draft_err = (torch.stack([tf(drafted(Path(p), side)) for p in paths]) - ref).abs().mean().item()
        assert 0 < draft_err and err <= 1.25 * draft_err, (err, draft_err)  # measured: err == draft_err, 0.037
    else:
        tf = T.Compose([T.Resize(pre.resize_size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
        shifted = []
        for p in paths:
            full = tf(Image.open(p).convert("RGB"))
            top, left = (full.shape[1] - 224) // 2 + 1, (full.shape[2] - 224) // 2
            shifted.append(full[:, top : top + 224, left : left + 224])
        one_px = (torch.stack(shifted) - ref).abs().mean().item()
        assert err < 0.5 * one_px, (err, one_px)  # measured 0.072 vs 0.5 * 0.179; 0.122 without antialiasing


def test_old_cache_side_upscaled_small_crops(tmp_path):
    """The check above can fail: a crop cut from the old 1.25x square (320 px at 224) is blurred."""
    photo = camera_photo(tmp_path / "camera.jpg")
    cache = open_decoded_cache([str(photo)], 320, tmp_path / "cache")
    x = torch.from_numpy(np.array(cache.images))
    box = SMALL_BOXES[0]
    assert (cached_crop(x, box, 224) - pil_crop(photo, box, 320, 224)).abs().mean() > 0.015


def real_photos(tmp_path: Path, n: int = 8) -> list[str]:
    """Real photos where the shared Imagenette copy is beside the repository, plus a camera-size JPEG."""
    shared = IMAGENETTE / "val"
    found = sorted(shared.glob("*/*.JPEG"))[::97][:n] if shared.is_dir() else []
    return [str(p) for p in found] + [str(camera_photo(tmp_path / "camera.jpg"))]


@pytest.mark.parametrize("side", [224, 517])
def test_batched_crop_gives_the_pixels_of_the_per_image_resize(tmp_path, side):
    """The device path (two batched matmuls with per-image antialiased weights, flips in them) against
    F.interpolate image by image (the CPU's uint8 kernel): within one level of 255 everywhere."""
    paths = real_photos(tmp_path)
    x = torch.from_numpy(np.stack([decode_fixed(p, side) for p in paths]))
    params = augment_params(len(paths), side, torch.Generator().manual_seed(0), scale=(0.08, 1.0))
    params[:, FLIP] = torch.arange(len(paths)) % 2  # both ways, whatever the draw
    whole = box_params((1.0, 1.0, 0.0, 0.0), side, flip=True)  # the whole square, mirrored
    for p in (params, whole.expand(len(paths), PARAM_COLUMNS)):
        batched = crop_resize_flip(x, 224, p, batched=True)
        each = crop_resize_flip(x, 224, p, batched=False)
        assert (batched - each).abs().max() <= 1.0 + 1e-3  # uint8 rounding of the per-image kernel only
        assert (batched - crop_resize_flip(x.float(), 224, p, batched=False)).abs().max() < 1e-2  # float: the same


def test_the_cpu_and_the_cuda_branch_draw_the_same_inputs(folder, tmp_path):
    """model_inputs on a CPU, with the per-image resize and with the batched one the GPU takes."""
    paths = train_paths(folder)
    cache = open_decoded_cache(paths, 40, tmp_path / "cache")
    rows = torch.from_numpy(np.array(cache.images))
    params = augment_params(len(paths), 40, torch.Generator().manual_seed(4), scale=(0.3, 1.0))
    pre = Preprocess(32, 36)
    each, batched = (model_inputs(rows, pre, params, batched=b) for b in (False, True))
    # one level of uint8 rounding, times the colour jitter's gain (at most 1.3 ** 3)
    assert (each - batched).abs().max() < 2.2 / 255 / min(pre.std)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_side_batches_give_the_same_pixels_on_cpu_and_cuda(tmp_path):
    photo = camera_photo(tmp_path / "camera.jpg")
    pre = Preprocess.for_size(224)
    cache = open_decoded_cache([str(photo)] * 4, pre.stored_side_for(True, 0.25, 1200), tmp_path / "cache")

    def batches(device: str) -> list[torch.Tensor]:
        out = []
        for augment in (True, False):
            loader = DeviceLoader(
                CachedRows(cache, [0, 1, 2, 3]), [0] * 4, 4, pre, torch.device(device), augment=augment, seed=5
            )
            out.append(next(iter(loader))[0].cpu())
        return out

    for cpu, cuda in zip(batches("cpu"), batches("cuda"), strict=True):
        assert (cpu - cuda).abs().max() < 0.05  # uint8 rounding on the CPU; same kernels, same antialiasing


# ----------------------------------------------------------------------------- one data path
def test_cache_off_trains_as_the_cache_does_and_evaluate_gives_the_logged_accuracy(tmp_path):
    """The same seed and flags with --cache off (rows decoded by two worker processes every epoch) and
    through the decoded cache: the same epochs, to float tolerance. Then evaluate.py --split val on the
    run's best.pt gives the validation accuracy it logged for its best epoch (the same pixels)."""
    import evaluate
    import train_parta
    from conftest import read_rows, train_args

    root = make_dataset(tmp_path / "ds", CLASSES[:3], n_train=8, n_val=3, size=56)
    runs = {}
    for cache in ("cached", "off"):
        flags = train_args(root, tmp_path / "runs", cache, 2, "--seed", "3", "--batch_size", "4")
        if cache == "off":
            flags += ["--cache", "off", "--workers", "2"]
        train_parta.main(train_parta.get_args_parser().parse_args(flags))
        runs[cache] = read_rows(tmp_path / "runs" / cache / "metrics.csv")
    assert len(runs["cached"]) == len(runs["off"]) == 2
    for a, b in zip(runs["cached"], runs["off"], strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["epoch"], key)
    best = max(runs["off"], key=lambda r: float(r["val_acc"]))
    result = evaluate.main(
        evaluate.get_args_parser().parse_args(
            [
                "--ckpt",
                str(tmp_path / "runs" / "off" / "best.pt"),
                "--split",
                "val",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
    )
    assert result["accuracy"] == pytest.approx(float(best["val_acc"]), abs=1e-9)
