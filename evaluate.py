"""Test metrics and predictions from a checkpoint alone.

    python evaluate.py --ckpt runs/<run>/best.pt                 # held-out accuracy, F1, confusion
    python evaluate.py --ckpt best.pt --predict photo.jpg dir/    # top-3 classes per image
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from torch import nn

import data
import engine
from data import UserError
from engine import add_bool, add_flag
from models import build_from_spec


# ----------------------------------------------------------------------------- model
def restore_model(ckpt_path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The trained model (eval mode, on device) and its checkpoint, from the file alone."""
    ckpt = engine.load_checkpoint(ckpt_path)
    try:
        model = build_from_spec(ckpt["spec"], len(ckpt["class_names"]))
    except (KeyError, TypeError) as e:
        raise UserError(f"{ckpt_path}: checkpoint lacks a usable model description ({e})") from None
    engine.load_weights(model, ckpt["model_state"], ckpt_path)
    return model.to(device).eval(), ckpt


def eval_transform(ckpt: dict):
    return data.build_transforms(ckpt["image_size"], False, ckpt["mean"], ckpt["std"])[1]


class FlipTTA(nn.Module):
    """Average the softmax of an image and its mirror image (test-time augmentation)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.model(x).float().softmax(1) + self.model(torch.flip(x, dims=[3])).float().softmax(1)
        return torch.log(p / 2)  # log-probabilities: argmax and softmax work as on logits


# ----------------------------------------------------------------------------- metrics
def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, n: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    return torch.bincount(targets * n + preds, minlength=n * n).reshape(n, n)


def classification_metrics(cm: torch.Tensor, class_names: list[str]) -> dict:
    cm = cm.double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    per_class = {name: {"accuracy": recall[i].item(), "precision": precision[i].item(), "f1": f1[i].item(),
                        "support": int(support[i].item())} for i, name in enumerate(class_names)}
    return {"accuracy": (tp.sum() / cm.sum().clamp(min=1)).item(), "macro_f1": f1.mean().item(),
            "per_class": per_class, "confusion_matrix": cm.long().tolist()}


def print_report(metrics: dict, title: str) -> None:
    names = list(metrics["per_class"])
    width = max(12, *(len(n) for n in names))
    print(title)
    print(f"{'class':<{width}} {'accuracy':>9} {'precision':>9} {'f1':>7} {'support':>8}")
    for name, m in metrics["per_class"].items():
        print(f"{name:<{width}} {m['accuracy']:>9.4f} {m['precision']:>9.4f} {m['f1']:>7.4f} {m['support']:>8}")
    print(f"{'overall':<{width}} {metrics['accuracy']:>9.4f} {'':>9} {metrics['macro_f1']:>7.4f} "
          f"{sum(m['support'] for m in metrics['per_class'].values()):>8}")
    print(f"test accuracy: {metrics['accuracy']:.4f}   macro F1: {metrics['macro_f1']:.4f}")
    print("confusion matrix (rows true, columns predicted):")
    short = [n[:6] for n in names]
    print(" " * width + " " + " ".join(f"{s:>6}" for s in short))
    for name, row in zip(names, metrics["confusion_matrix"]):
        print(f"{name:<{width}} " + " ".join(f"{v:>6}" for v in row))


def plot_confusion(cm, class_names: list[str], out: Path, normalize: bool = True, title: str = "") -> None:
    """Confusion matrix heat map, normalised per true class, with class names on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
                ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.5 * (1 if normalize else (shown.max().item() or 1)) else "black")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ----------------------------------------------------------------------------- prediction
def collect_images(paths: list[str]) -> list[str]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file() and data.is_image_file(f))
        elif p.is_file():
            files.append(str(p))
        else:
            raise UserError(f"--predict: no such file or folder: {p}")
    if not files:
        raise UserError(f"--predict: no image files found in {', '.join(paths)}")
    return files


@torch.no_grad()
def predict(model: nn.Module, ckpt: dict, files: list[str], device: torch.device, k: int = 3) -> list[dict]:
    """Top-k classes with probabilities per image; unreadable files are reported and skipped."""
    transform = eval_transform(ckpt)
    names = ckpt["class_names"]
    rows = []
    for path in files:
        try:
            x = transform(data.load_image(path)).unsqueeze(0).to(device)
        except Exception as e:
            print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        probs = model(x).float().softmax(1)[0]
        top = probs.topk(min(k, len(names)))
        rows.append({"path": path, "top": [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    return rows


def write_predictions_csv(rows: list[dict], out: Path, k: int = 3) -> None:
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"] + [c for i in range(1, k + 1) for c in (f"class_{i}", f"prob_{i}")])
        for r in rows:
            writer.writerow([r["path"]] + [v for name, p in r["top"] for v in (name, f"{p:.6f}")])


# ----------------------------------------------------------------------------- main
def heldout_samples(ckpt: dict, data_dir: str, split: str) -> tuple[list, str]:
    """Samples of the held-out split (test) or the run's saved validation split (val)."""
    ds = data.discover(data_dir, need_heldout=split == "test")
    if ds.classes != ckpt["class_names"]:
        raise UserError(f"classes in {ds.root} ({', '.join(ds.classes)}) differ from the checkpoint's "
                        f"({', '.join(ckpt['class_names'])})")
    if split == "val":
        if "split" not in ckpt:
            raise UserError("--split val needs the run's saved split, and this checkpoint has none")
        return data.split_from_json(ds.root, ckpt["split"], ds.classes)[1], "val (the run's validation split)"
    return ds.heldout, f"{ds.heldout_name} (held-out)"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on the held-out split, or predict images.")
    add_flag(parser, "ckpt", required=True, help="checkpoint file (best.pt or last.pt) or its run folder")
    add_flag(parser, "data_dir", default=None, help="dataset root (default: the one the run trained on)")
    add_flag(parser, "split", default="test", choices=("test", "val"),
             help="test = the held-out val/ or test/ folder; val = the run's own validation split (default: %(default)s)")
    add_flag(parser, "out", default=None, help="folder for eval.json and confusion_matrix.png (default: beside the checkpoint)")
    add_bool(parser, "tta", False, "average predictions over the image and its horizontal mirror")
    parser.add_argument("--predict", nargs="+", metavar="PATH", help="image files or folders: print the top 3 classes")
    add_flag(parser, "csv", default=None, help="with --predict: also write the predictions to this CSV file")
    add_flag(parser, "batch_size", type=int, default=128, help="batch size (default: %(default)s)")
    add_flag(parser, "workers", type=int, default=min(8, __import__("os").cpu_count() or 1),
             help="data loading processes (default: %(default)s)")
    add_flag(parser, "device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> dict:
    device = engine.select_device(args.device)
    model, ckpt = restore_model(args.ckpt, device)
    if args.tta:
        model = FlipTTA(model)
    if args.predict:
        rows = predict(model, ckpt, collect_images(args.predict), device)
        for r in rows:
            print(f"{r['path']}: " + ", ".join(f"{name} {p:.3f}" for name, p in r["top"]))
        if args.csv:
            write_predictions_csv(rows, Path(args.csv))
            print(f"wrote {args.csv}")
        return {"predictions": rows}
    data_dir = args.data_dir or ckpt["config"].get("data_dir", data.DEFAULT_DATA_DIR)
    samples, split_name = heldout_samples(ckpt, data_dir, args.split)
    loader = data.make_loader(data.ImageListDataset(samples, eval_transform(ckpt)), args.batch_size, False,
                              args.workers, pin_memory=device.type == "cuda")
    result = engine.evaluate(model, loader, device, engine.amp_dtype("auto", device), return_outputs=True)
    preds = result["probs"].argmax(1)
    metrics = classification_metrics(confusion_matrix(result["targets"], preds, len(ckpt["class_names"])),
                                     ckpt["class_names"])
    metrics.update(checkpoint=str(args.ckpt), split=split_name, data_dir=str(data_dir), n=result["n"],
                   loss=result["loss"], tta=args.tta, epoch=ckpt.get("epoch"))
    out = Path(args.out) if args.out else Path(args.ckpt).parent if Path(args.ckpt).is_file() else Path(args.ckpt)
    out.mkdir(parents=True, exist_ok=True)
    print_report(metrics, f"{args.ckpt} on {split_name}: {result['n']} images")
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    plot_confusion(metrics["confusion_matrix"], ckpt["class_names"], out / "confusion_matrix.png",
                   title=f"Confusion matrix, {split_name}, accuracy {metrics['accuracy']:.3f}")
    print(f"wrote {out / 'eval.json'} and {out / 'confusion_matrix.png'}")
    return metrics


if __name__ == "__main__":
    engine.run_cli(main, get_args_parser())
