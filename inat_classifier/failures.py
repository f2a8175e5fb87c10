"""Where the model fails: the held-out photos with the highest loss, and the class pairs it confuses most.

The loss of one photo is the cross-entropy of its true class: high when the model is sure and
wrong, or unsure of the right answer. The photos at the top of that list are the ones to look at
first (mislabelled photos, look-alike classes, photos where the subject is tiny or missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from inat_classifier.figures import RIGHT, WRONG, pyplot, save_figure


def most_confused(confusion: Sequence[Sequence[int]], class_names: Sequence[str], k: int = 5) -> list[dict]:
    """The k largest off-diagonal cells of a confusion matrix (rows true, columns predicted), largest first.

    Each is {"true", "predicted", "count", "fraction"}: fraction of the true class's photos sent there.
    """
    cm = torch.as_tensor(confusion, dtype=torch.long)
    off = cm.clone()
    off.fill_diagonal_(0)
    support = cm.sum(1)
    counts, flat = off.flatten().sort(descending=True, stable=True)
    pairs = []
    for count, cell in zip(counts.tolist()[:k], flat.tolist()[:k], strict=True):
        if count == 0:
            break
        t, p = divmod(cell, cm.shape[1])
        pairs.append(
            {"true": class_names[t], "predicted": class_names[p], "count": count, "fraction": count / int(support[t])}
        )
    return pairs


def print_most_confused(pairs: list[dict]) -> None:
    if not pairs:
        print("most confused: no photo was misclassified")
        return
    print("most confused (true -> predicted: photos, share of the true class):")
    for pair in pairs:
        print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']} ({pair['fraction']:.0%})")


def highest_losses(outputs: torch.Tensor, targets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row positions of the n photos with the highest cross-entropy, highest first, and those losses."""
    losses = F.cross_entropy(outputs.float(), targets, reduction="none")
    order = losses.argsort(descending=True, stable=True)[:n]
    return order, losses[order]


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
            f"true: {class_names[panel['true']]} ({panel['true_prob']:.0%})\n"
            f"pred: {class_names[panel['pred']]} ({panel['prob']:.0%})\nloss {panel['loss']:.2f}",
            fontsize=9,
            color=colour,
        )
    fig.suptitle(title, fontsize=11)
    save_figure(fig, out, dpi)
