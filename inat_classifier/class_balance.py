"""Class frequencies of a training split: counts, the imbalance ratio, balanced loss weights and draw weights."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

# Above this largest/smallest class ratio, start-up and `data.py stats` suggest the balancing flags.
IMBALANCE_NOTE_RATIO = 3.0
BALANCING_FLAGS = "--class_weights balanced or --sampler balanced"


def class_counts(labels: Iterable[int], num_classes: int) -> list[int]:
    """Samples per class (0 for a class without any)."""
    counts = [0] * num_classes
    for label in labels:
        counts[int(label)] += 1
    return counts


def imbalance_ratio(counts: Sequence[int]) -> float:
    """Largest class count over the smallest non-empty one (1.0 for a balanced set or no samples)."""
    present = [c for c in counts if c > 0]
    return max(present) / min(present) if present else 1.0


def balanced_class_weights(counts: Sequence[int]) -> torch.Tensor:
    """n_samples / (n_classes * count_c) per class, as scikit-learn's class_weight="balanced":
    every class then weighs the same in the loss in total. A class without samples gets 0."""
    total, k = sum(counts), len(counts)
    return torch.tensor([total / (k * c) if c > 0 else 0.0 for c in counts], dtype=torch.float32)


def balanced_draw_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per sample, 1 / (its class's count): drawing by these weights picks every class equally often."""
    counts = class_counts(labels, max(labels, default=-1) + 1)
    return torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.float64)


def imbalance_line(
    counts: Sequence[int], classes: Sequence[str], balancing: str | None = None, what: str = "class balance"
) -> str:
    """One line on the training photos' balance: the ratio and its two classes (empty classes left out), and
    a suggestion when it is over IMBALANCE_NOTE_RATIO and nothing balances it (`balancing`: the flags in use)."""
    present = [(n, c) for n, c in zip(counts, classes, strict=True) if n > 0]
    if not present:
        return f"{what}: no training photos"
    (most, big), (least, small) = max(present), min(present)
    line = f"{what}: imbalance ratio {most / least:.1f} (largest {big} {most}, smallest {small} {least})"
    if balancing:
        return f"{line}; balanced by {balancing}"
    if most / least > IMBALANCE_NOTE_RATIO:
        return f"{line}; consider {BALANCING_FLAGS}"
    return line


def balancing_in_use(args) -> str | None:
    """The balancing flags a run has on, as typed (None when neither)."""
    used = [
        f"--{name} balanced"
        for name, off in (("class_weights", "none"), ("sampler", "random"))
        if getattr(args, name, off) != off
    ]
    return " and ".join(used) or None


def split_balance_line(samples: Sequence[tuple[str, int]], classes: Sequence[str], args) -> str:
    """imbalance_line of a run's training split (path, label) and its flags: what start-up prints."""
    counts = class_counts((label for _, label in samples), len(classes))
    return imbalance_line(counts, classes, balancing_in_use(args))
