"""The one definition of preprocessing: how a photo becomes a model input, for training and evaluation.

Like torchvision's presets and `weights.transforms()`: one `Preprocess` object (input size, resize
rule, centre crop, mean/std) is built once per run, saved in every checkpoint, and used by the PIL
path, the decoded cache, the device-side augmentation, evaluate.py, visualize.py and the Part B
feature cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval images are resized so the short side is image_size / CROP_RATIO, then centre-cropped
# (the standard 0.875 ratio).
CROP_RATIO = 0.875
# The random resized crop's aspect-ratio range (RandomResizedCrop's default) and colour jitter.
ASPECT_RANGE = (3 / 4, 4 / 3)
COLOR_JITTER = 0.3


@dataclass(frozen=True)
class Preprocess:
    """Eval: short side to `resize_size` (bilinear, antialiased), centre crop `image_size`, normalise.

    Training with augmentation: a random resized crop keeping (crop_scale, 1] of the area at an
    aspect ratio in ASPECT_RANGE, a horizontal flip and colour jitter, then the same normalisation.
    """

    image_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_size(cls, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> "Preprocess":
        return cls(image_size, int(round(image_size / CROP_RATIO)), tuple(mean), tuple(std))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["image_size"]), int(d["resize_size"]), tuple(d["mean"]), tuple(d["std"]))

    def to_dict(self) -> dict:
        """Plain JSON types, so a checkpoint holding it loads with weights_only=True."""
        return {"image_size": self.image_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std)}

    def eval_transform(self) -> Callable:
        """PIL image -> normalised tensor, never augmented."""
        from torchvision import transforms as T

        return T.Compose([T.Resize(self.resize_size), T.CenterCrop(self.image_size),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])

    def train_transform(self, crop_scale: float) -> Callable:
        """PIL image -> augmented, normalised tensor (the PIL twin of device_batches.augment_batch)."""
        from torchvision import transforms as T

        return T.Compose([
            T.RandomResizedCrop(self.image_size, scale=(crop_scale, 1.0), ratio=ASPECT_RANGE),
            T.RandomHorizontalFlip(),
            T.ColorJitter(COLOR_JITTER, COLOR_JITTER, COLOR_JITTER),
            T.ToTensor(), T.Normalize(self.mean, self.std),
        ])

    def stored_side(self, augment: bool, crop_scale: float, largest_short_side: int) -> int:
        """Side of the square the decoded cache keeps of every photo (its centre, short side resized).

        Evaluation needs the eval resize. The smallest random crop keeps crop_scale of the area at
        an aspect ratio of 3/4, so its short side is sqrt(crop_scale * 3/4) of the stored side: it
        must still span image_size pixels, or it would be upscaled (blurred) where the PIL path
        crops the full photo. Never more than the photos have, which would add bytes, not detail.
        """
        if not augment:
            return self.resize_size
        needed = math.ceil(self.image_size / math.sqrt(crop_scale * ASPECT_RANGE[0]))
        return max(self.resize_size, min(needed, largest_short_side))

    def eval_region(self, stored_side: int) -> tuple[int, int]:
        """(offset, side) of the eval centre crop inside a stored square, in stored pixels."""
        side = max(self.image_size, int(round(self.image_size * stored_side / self.resize_size)))
        return int(round((stored_side - side) / 2.0)), side
