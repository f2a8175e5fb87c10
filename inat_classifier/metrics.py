"""Classification metrics: confusion matrix, per-class recall/precision/F1, their report and heat map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from inat_classifier.figures import pyplot
from inat_classifier.storage import save_png

CONFUSION_PNG = "confusion_matrix.png"  # evaluate.py and `visualize.py confusion` write the one figure, one name


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, n: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    return torch.bincount(targets * n + preds, minlength=n * n).reshape(n, n)


def classification_metrics(cm: torch.Tensor, class_names: list[str]) -> dict:
    """Accuracy, macro F1 and per-class figures; a class with no test photo has no F1 to average.

    A class's `recall` is the share of its photos predicted as it (older eval.json files call it
    `accuracy`; nothing reads the per-class figures back).

    Counting such a class as F1 0 would lower macro F1 for a photo that was never there (e.g.
    all of a held-out class unreadable): it is left out, and named in `macro_f1_excluded`.
    """
    cm = cm.double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp)
    )
    per_class = {
        name: {
            "recall": recall[i].item(),
            "precision": precision[i].item(),
            "f1": f1[i].item(),
            "support": int(support[i].item()),
        }
        for i, name in enumerate(class_names)
    }
    present = support > 0
    macro_f1 = f1[present].mean().item() if present.any() else 0.0
    return {
        "accuracy": (tp.sum() / cm.sum().clamp(min=1)).item(),
        "macro_f1": macro_f1,
        "macro_f1_excluded": [name for i, name in enumerate(class_names) if not present[i]],
        "per_class": per_class,
        "confusion_matrix": cm.long().tolist(),
    }


def print_report(metrics: dict, title: str) -> None:
    names = list(metrics["per_class"])
    width = max(12, *(len(n) for n in names))
    print(title)
    print(f"{'class':<{width}} {'recall':>9} {'precision':>9} {'f1':>7} {'support':>8}")
    for name, m in metrics["per_class"].items():
        print(f"{name:<{width}} {m['recall']:>9.4f} {m['precision']:>9.4f} {m['f1']:>7.4f} {m['support']:>8}")
    print(
        f"{'overall':<{width}} {metrics['accuracy']:>9.4f} {'':>9} {metrics['macro_f1']:>7.4f} "
        f"{sum(m['support'] for m in metrics['per_class'].values()):>8}"
    )
    print(f"test accuracy: {metrics['accuracy']:.4f}   macro F1: {metrics['macro_f1']:.4f}")
    excluded = metrics.get("macro_f1_excluded") or []
    if excluded:
        print(
            f"macro F1 over {len(names) - len(excluded)} of {len(names)} classes: {', '.join(excluded)} "
            f"{'have' if len(excluded) > 1 else 'has'} no readable test photo (support 0), so no F1"
        )
    print("confusion matrix (rows true, columns predicted):")
    short = [n[:6] for n in names]
    print(" " * width + " " + " ".join(f"{s:>6}" for s in short))
    for name, row in zip(names, metrics["confusion_matrix"], strict=True):
        print(f"{name:<{width}} " + " ".join(f"{v:>6}" for v in row))


def plot_confusion(cm, class_names: list[str], out: Path, normalize: bool = True, title: str = "") -> None:
    """Confusion matrix heat map, normalised per true class, with class names on both axes."""
    plt = pyplot()

    cm = torch.as_tensor(cm, dtype=torch.float64)
    shown = cm / cm.sum(1, keepdim=True).clamp(min=1) if normalize else cm
    n = len(class_names)
    size = max(6.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=120)
    im = ax.imshow(shown.numpy(), cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "Confusion matrix")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                v = shown[i, j].item()
                ax.text(
                    j,
                    i,
                    f"{v:.2f}" if normalize else f"{int(v)}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > 0.5 * (1 if normalize else (shown.max().item() or 1)) else "black",
                )
    fig.tight_layout()
    try:
        save_png(fig, out)
    finally:
        plt.close(fig)


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


def write_confusion(metrics: dict, class_names: list[str], folder: Path, split_name: str) -> Path:
    """The held-out confusion matrix as folder/confusion_matrix.png: the same figure from either script."""
    out = folder / CONFUSION_PNG
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"Confusion matrix, {split_name}, {metrics['n']} images, accuracy {metrics['accuracy']:.3f}"
    plot_confusion(metrics["confusion_matrix"], class_names, out, title=title)
    return out
