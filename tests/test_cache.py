"""The decoded-image cache and device-side batches: same pixels, rebuilt on change, safe after a crash."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import CLASSES, make_dataset


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", CLASSES[:2], n_train=4, n_val=1, size=40)


def train_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "train").rglob("*") if p.is_file())


def test_cache_holds_exactly_the_directly_decoded_pixels(folder, tmp_path):
    paths = train_paths(folder)
    cache = data.open_decoded_cache(paths, 36, tmp_path / "cache")
    assert cache.images.shape == (len(paths), 3, 36, 36) and cache.images.dtype == np.uint8
    for i, p in enumerate(paths):
        assert np.array_equal(cache.images[i], data.decode_fixed(p, 36))


def test_decode_fixed_matches_the_eval_transform_resize_and_crop(tmp_path):
    from torchvision import transforms as T

    path = tmp_path / "wide.png"  # PNG: no JPEG draft mode, so the pixels must match exactly
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)).save(path)
    ours = data.decode_fixed(str(path), 32)
    ref = np.asarray(T.CenterCrop(32)(T.Resize(32)(Image.open(path).convert("RGB")))).transpose(2, 0, 1)
    assert np.array_equal(ours, ref)


def test_cache_is_reused_and_rebuilt_when_files_change(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    paths = train_paths(folder)
    first = data.open_decoded_cache(paths, 32, cache_dir)
    assert data.open_decoded_cache(paths, 32, cache_dir).path == first.path  # reused
    # change a file's content (and mtime)
    Image.new("RGB", (40, 40), (255, 255, 255)).save(paths[0])
    os.utime(paths[0], ns=(1, 10**18))
    changed = data.open_decoded_cache(paths, 32, cache_dir)
    assert changed.path != first.path and changed.images[0].min() == 255
    # add a file, then delete one
    extra = Path(paths[0]).with_name("extra.png")
    Image.new("RGB", (40, 40), (0, 0, 0)).save(extra)
    added = data.open_decoded_cache(sorted(paths + [str(extra)]), 32, cache_dir)
    assert added.images.shape[0] == len(paths) + 1 and added.path not in (first.path, changed.path)
    os.remove(paths[1])
    removed = data.open_decoded_cache([p for p in paths if p != paths[1]], 32, cache_dir)
    assert removed.images.shape[0] == len(paths) - 1


def test_half_written_cache_is_detected_and_rebuilt(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    paths = train_paths(folder)
    good = data.open_decoded_cache(paths, 32, cache_dir)
    reference = np.array(good.images)
    key_json = good.path.with_suffix(".json")
    # a build killed before its marker was written: the array exists, the .json does not
    key_json.unlink()
    with open(good.path, "r+b") as f:
        f.truncate(good.path.stat().st_size // 2)
    rebuilt = data.open_decoded_cache(paths, 32, cache_dir)
    assert np.array_equal(np.array(rebuilt.images), reference)
    # a truncated array under a valid marker is not trusted either
    with open(rebuilt.path, "r+b") as f:
        f.truncate(rebuilt.path.stat().st_size // 2)
    again = data.open_decoded_cache(paths, 32, cache_dir)
    assert np.array_equal(np.array(again.images), reference)
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def batch_u8(n: int = 6, size: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_device_augmentation_keeps_shape_dtype_and_range_and_is_seeded():
    x = batch_u8()
    params = data.augment_params(6, torch.Generator().manual_seed(1))
    out = data.augment_batch(x, 32, params)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    again = data.augment_batch(x, 32, data.augment_params(6, torch.Generator().manual_seed(1)))
    other = data.augment_batch(x, 32, data.augment_params(6, torch.Generator().manual_seed(2)))
    assert torch.equal(out, again) and not torch.equal(out, other)
    normed = data.augment_batch(x, 32, params, data.IMAGENET_MEAN, data.IMAGENET_STD)
    lo = min((0 - m) / s for m, s in zip(data.IMAGENET_MEAN, data.IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(data.IMAGENET_MEAN, data.IMAGENET_STD))
    assert normed.min() >= lo - 1e-5 and normed.max() <= hi + 1e-5


def test_colour_jitter_as_one_affine_map_equals_torchvision():
    from torchvision.transforms import functional as TF

    img = torch.rand(2, 3, 16, 16) * 0.5 + 0.25  # mid-range: no clipping in between
    factors = torch.tensor([[1.2, 0.8, 1.1], [0.8, 1.25, 0.75]])
    A, t = data.color_affine(factors, img.mean(dim=(2, 3)))
    ours = data.affine_normalize(img, A, t, None, None)
    for i, (b, c, s) in enumerate(factors.tolist()):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img[i], b), c), s)
        assert torch.allclose(ours[i], ref, atol=1e-5)


def test_eval_batches_are_never_augmented(folder, tmp_path):
    paths = train_paths(folder)
    cache = data.open_decoded_cache(paths, 36, tmp_path / "cache")
    loader = data.DeviceLoader(cache, list(range(len(paths))), [0] * len(paths), 4, 32, data.IMAGENET_MEAN,
                               data.IMAGENET_STD, torch.device("cpu"), augment=False, shuffle=False)
    expected = data.normalize_batch(data.center_crop_batch(torch.from_numpy(np.array(cache.images)), 32),
                                    data.IMAGENET_MEAN, data.IMAGENET_STD)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        got = torch.cat([x for x, _ in loader])
        assert torch.allclose(got, expected, atol=1e-6)


def test_crop_scale_bounds_the_crop_area_on_both_pipelines():
    g = torch.Generator().manual_seed(0)
    mild = data.augment_params(2000, g, scale=(0.8, 1.0))
    strong = data.augment_params(2000, g, scale=(0.1, 1.0))
    # w and h are clamped to the full side, so the kept area can only shrink below the drawn one.
    assert (mild["w"] * mild["h"]).min() > 0.55 and (strong["w"] * strong["h"]).min() < 0.15
    train_tf, _ = data.build_transforms(32, True, crop_scale=0.8)
    crop = next(t for t in train_tf.transforms if type(t).__name__ == "RandomResizedCrop")
    assert crop.scale == (0.8, 1.0)


def test_device_loader_draws_crops_at_its_crop_scale(folder, tmp_path):
    paths = train_paths(folder)
    cache = data.open_decoded_cache(paths, 36, tmp_path / "cache")

    def batch(scale: float) -> torch.Tensor:
        loader = data.DeviceLoader(cache, list(range(len(paths))), [0] * len(paths), len(paths), 32,
                                   data.IMAGENET_MEAN, data.IMAGENET_STD, torch.device("cpu"), augment=True,
                                   seed=3, crop_scale=scale)
        return next(iter(loader))[0]

    assert torch.equal(batch(0.5), batch(0.5)) and not torch.equal(batch(0.5), batch(0.3))


def test_training_caches_keep_headroom_and_eval_batches_resize_the_same_centre(folder, tmp_path):
    assert data.cache_size(64, augment=False) == data.resize_size(64) == 73
    assert data.cache_size(64, augment=True) == 91  # crops of half the area stay >= 64 px
    paths = train_paths(folder)
    stored = data.cache_size(32, augment=True)
    cache = data.open_decoded_cache(paths, stored, tmp_path / "cache")
    loader = data.DeviceLoader(cache, list(range(len(paths))), [0] * len(paths), len(paths), 32, data.IMAGENET_MEAN,
                               data.IMAGENET_STD, torch.device("cpu"), augment=False)
    got = next(iter(loader))[0]
    centre = data.center_crop_batch(torch.from_numpy(np.array(cache.images)), round(32 * stored / data.resize_size(32)))
    resized = torch.nn.functional.interpolate(centre, size=(32, 32), mode="bilinear", antialias=True)
    assert got.shape == (len(paths), 3, 32, 32)
    assert torch.allclose(got, data.normalize_batch(resized, data.IMAGENET_MEAN, data.IMAGENET_STD), atol=1e-6)
