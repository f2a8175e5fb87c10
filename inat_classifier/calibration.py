"""How sure the model is: calibration measures, temperature scaling, and the reliability diagram.

A model is calibrated when, of the photos it gives 0.8 to, 80 % are right. The measures:
- ECE (expected calibration error) over 15 equal-width confidence bins (Guo et al., 2017): the
  photo-weighted mean gap between a bin's accuracy and its mean confidence;
- NLL, the mean negative log-likelihood of the true class (what training minimises);
- the Brier score, the mean squared distance of the probability vector from the one-hot truth.

Temperature scaling divides the logits by one number T fitted on the run's validation split: the
predicted class never changes, only how sure the model says it is. The checkpoint stores T as
`temperature`, and every inference path (evaluate.py, --predict, visualize.py, export.py) uses it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from inat_classifier.cli import UserError
from inat_classifier.figures import pyplot, save_figure

ECE_BINS = 15


def temperature_of(ckpt: dict) -> float:
    """The checkpoint's fitted temperature; 1.0 (the logits as trained) when it has none."""
    t = ckpt.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise UserError(f"checkpoint field 'temperature' must be a positive number, got {t!r}")
    return float(t)


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: its range, photo count, mean confidence and accuracy."""
    conf, pred = probs.max(1)
    correct = (pred == targets).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first bin.
    which = (torch.ceil(conf.double() * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(which, minlength=bins).double()
    conf_sum = torch.bincount(which, conf.double(), minlength=bins)
    right = torch.bincount(which, correct, minlength=bins)
    rows = []
    for b in range(bins):
        n = int(count[b])
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": n,
                "confidence": conf_sum[b].item() / n if n else None,
                "accuracy": right[b].item() / n if n else None,
            }
        )
    return rows


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """sum over bins of (n_b / N) * |accuracy_b - confidence_b|."""
    rows = reliability_bins(probs, targets, bins)
    total = sum(r["count"] for r in rows)
    return sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])


def calibration_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """ECE (15 bins), NLL and Brier score of logits (or log-probabilities) against the true classes."""
    logits = logits.double()
    probs = logits.softmax(1)
    one_hot = F.one_hot(targets, probs.shape[1]).double()
    return {
        "ece": expected_calibration_error(probs, targets),
        "ece_bins": ECE_BINS,
        "nll": F.cross_entropy(logits, targets).item(),
        "brier": ((probs - one_hot) ** 2).sum(1).mean().item(),
        "reliability": reliability_bins(probs, targets),
    }


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of logits / T, by L-BFGS on log T (so T stays positive)."""
    logits, targets = logits.double(), targets.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    t = log_t.exp().item()
    if not math.isfinite(t):  # e.g. a model that is right on every photo: NLL falls as T -> 0
        raise UserError("the temperature fit did not converge (is the model right or wrong on every photo?)")
    return t


def plot_reliability(metrics: dict, title: str, out: Path, dpi: int = 110) -> None:
    """Accuracy against confidence per bin, the diagonal of perfect calibration, and each bin's count."""
    plt = pyplot()
    rows = metrics["reliability"]
    width = 1 / len(rows)
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(6, 6.6), dpi=dpi, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = [r for r in rows if r["count"]]
    lefts = [r["low"] for r in filled]
    ax.bar(
        lefts,
        [r["accuracy"] for r in filled],
        width=width,
        align="edge",
        color="#4477aa",
        edgecolor="white",
        label="accuracy",
    )
    ax.bar(  # the gap between accuracy and mean confidence, hatched over the accuracy bar or above it
        lefts,
        [abs(r["confidence"] - r["accuracy"]) for r in filled],
        bottom=[min(r["accuracy"], r["confidence"]) for r in filled],
        width=width,
        align="edge",
        fill=False,
        hatch="//",
        edgecolor="#cc3311",
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in bin")
    ax.set_title(
        f"{title}\nECE {metrics['ece']:.3f} ({len(rows)} equal-width bins), NLL {metrics['nll']:.3f}", fontsize=10
    )
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(
        [r["low"] for r in rows],
        [r["count"] for r in rows],
        width=width,
        align="edge",
        color="#888888",
        edgecolor="white",
    )
    for r in filled:
        ax_n.text(r["low"] + width / 2, r["count"], str(r["count"]), ha="center", va="bottom", fontsize=6)
    ax_n.set(xlabel="confidence (top-1 probability)", ylabel="photos")
    fig.tight_layout()
    save_figure(fig, out, dpi)
