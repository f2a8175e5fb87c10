"""A built pretrained backbone: the model with its new head, and the input its weights expect."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from inat_classifier.presets import Preprocess


@dataclass
class Backbone:
    """A pretrained classifier with a new head, and what its weights expect as input."""

    model: nn.Module
    spec: dict
    head_name: str
    image_size: int
    mean: tuple
    std: tuple
    weights_source: str

    def preprocess(self, image_size: int | None = None) -> Preprocess:
        """The weights' preprocessing, at their own input size unless --image_size says otherwise."""
        return Preprocess.for_size(image_size or self.image_size, self.mean, self.std)
