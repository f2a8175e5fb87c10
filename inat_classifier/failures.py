"""Where the model fails: the held-out photos with the highest loss (the most-confused class pairs are in metrics.py).

The loss of one photo is the cross-entropy of its true class: high when the model is sure and
wrong, or unsure of the right answer. The photos at the top of that list are the ones to look at
first (mislabelled photos, look-alike classes, photos where the subject is tiny or missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from inat_classifier.figures import RIGHT, WRONG, pyplot, save_figure, unnormalize
from inat_classifier.inference import Predictions, load_input
from inat_classifier.presets import Preprocess


def highest_losses(outputs: torch.Tensor, targets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row positions of the n photos with the highest cross-entropy, highest first, and those losses."""
    losses = F.cross_entropy(outputs.float(), targets, reduction="none")
    order = losses.argsort(descending=True, stable=True)[:n]
    return order, losses[order]


def top_loss_panels(p: Predictions, samples: Sequence[tuple[str, int]], preprocess: Preprocess, n: int):
    """The n photos with the highest loss as figure panels (highest first), and their model inputs."""
    order, losses = highest_losses(p.outputs, p.targets, n)
    paths = [samples[p.index[i]][0] for i in order.tolist()]
    x = torch.stack([load_input(path, preprocess) for path in paths])
    panels = []
    for j, (i, loss) in enumerate(zip(order.tolist(), losses.tolist(), strict=True)):
        true, pred, probs = int(p.targets[i]), int(p.preds[i]), p.probs[i]
        image = unnormalize(x[j], preprocess.mean, preprocess.std)
        panels.append(
            dict(path=paths[j], image=image, true=true, pred=pred, prob=probs[pred].item(),
                 true_prob=probs[true].item(), loss=loss)
        )  # fmt: skip
    return panels, x


def plot_top_losses(panels: list[dict], class_names: Sequence[str], title: str, out: Path, dpi: int) -> None:
    """A grid of photos, each titled with its true class, the prediction, its probability and the loss.

    Each panel holds "image" ((H, W, 3) in [0, 1]), "true", "pred", "prob" (of the prediction),
    "true_prob", "loss", and optionally "cam" ((H, W) in [0, 1]) drawn over the photo.
    """
    plt = pyplot()
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows + 0.5), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels, strict=False):
        colour = RIGHT if panel["pred"] == panel["true"] else WRONG
        ax.imshow(panel["image"].numpy())
        if panel.get("cam") is not None:
            ax.imshow(panel["cam"].numpy(), cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(
            f"true: {class_names[panel['true']]} ({panel['true_prob']:.1%})\n"
            f"pred: {class_names[panel['pred']]} ({panel['prob']:.0%})\nloss {panel['loss']:.2f}",
            fontsize=9,
            color=colour,
        )
    fig.suptitle(title, fontsize=11)
    save_figure(fig, out, dpi)
