"""The one definition of preprocessing: how a photo becomes a model input, for training and evaluation.

Like torchvision's presets and `weights.transforms()`: one `Preprocess` object (input size, resize
rule, stored side, centre crop, mean/std) is built once per run, saved in every checkpoint, and
used by the one batch pipeline (device_batches.py) for training, validation, evaluate.py,
visualize.py and the Part B feature cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

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
    """Every photo: short side resized to `decode_side` (bilinear, after JPEG draft decoding), centre square.

    Eval: the centre `eval_region` of that square (what `resize_size` then a centre `image_size`
    crop keep), resized to `image_size` (antialiased), normalised. Training with augmentation: a
    random crop of the square keeping (crop_scale, 1] of its area at an aspect ratio in
    ASPECT_RANGE, resized to `image_size`, a horizontal flip and colour jitter, then the same
    normalisation. device_batches.py does both, on whole batches.
    """

    image_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Side of the square every photo is decoded to before any crop (0: resize_size). A run that
    # augments keeps more pixels (stored_side_for); its checkpoint records the side, so evaluation
    # decodes every photo exactly as the run's validation did.
    stored_side: int = 0

    @property
    def decode_side(self) -> int:
        """The side of the square (short side resized, centre crop) each photo is decoded to."""
        return self.stored_side or self.resize_size

    @classmethod
    def for_size(
        cls, image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> Preprocess:
        return cls(image_size, int(round(image_size / CROP_RATIO)), tuple(mean), tuple(std))

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(
            int(d["image_size"]), int(d["resize_size"]), tuple(d["mean"]), tuple(d["std"]), int(d.get("stored_side", 0))
        )

    def to_dict(self) -> dict:
        """Plain JSON types, so a checkpoint holding it loads with weights_only=True."""
        return {
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "stored_side": self.stored_side,
        }

    def with_stored_side(self, augment: bool, crop_scale: float, largest_short_side: int) -> Preprocess:
        """This preprocessing with the stored side a run needs (stored_side_for)."""
        return replace(self, stored_side=self.stored_side_for(augment, crop_scale, largest_short_side))

    def stored_side_for(self, augment: bool, crop_scale: float, largest_short_side: int) -> int:
        """Side of the square kept of every photo (its centre, short side resized) for a run.

        Evaluation needs the eval resize. The smallest random crop keeps crop_scale of the area at
        an aspect ratio of 3/4, so its short side is sqrt(crop_scale * 3/4) of the stored side: it
        must still span image_size pixels, or it would be upscaled (blurred). Never more than the
        photos have, which would add bytes, not detail.
        """
        if not augment:
            return self.resize_size
        needed = math.ceil(self.image_size / math.sqrt(crop_scale * ASPECT_RANGE[0]))
        return max(self.resize_size, min(needed, largest_short_side))

    def eval_region(self, stored_side: int) -> tuple[int, int]:
        """(offset, side) of the eval centre crop inside a stored square, in stored pixels."""
        side = max(self.image_size, int(round(self.image_size * stored_side / self.resize_size)))
        return int(round((stored_side - side) / 2.0)), side
