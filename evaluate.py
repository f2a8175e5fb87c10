"""Test metrics and predictions from a checkpoint alone.

python evaluate.py --ckpt runs/<run>/best.pt                 # held-out accuracy, F1, confusion
python evaluate.py --ckpt best.pt --predict photo.jpg dir/    # top-3 classes per image
python evaluate.py --ckpt runs/<run>/best.pt --calibrate     # fit a temperature on the validation split, store it
python evaluate.py --ckpt runs/<run>/best.onnx               # the same metrics of an exported model
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C or SIGTERM meanwhile is one line (startup.py)
    from inat_classifier import startup

    startup.stop_quietly()

import argparse
import csv
import json
import os
from pathlib import Path

import torch
from torch import nn

from inat_classifier.calibration import calibration_metrics, fit_temperature, temperature_of
from inat_classifier.checkpoint import atomic_torch_save, exported_format, preprocess_of
from inat_classifier.cli import UserError, add_bool, add_flag, on_failure, run_cli
from inat_classifier.devices import select_device
from inat_classifier.exported import load_exported
from inat_classifier.inference import (
    FlipTTA,
    Predictions,
    collect_images,
    evaluate_predictions,
    heldout_samples,
    predict_readable,
    run_data_dir,
    top_classes,
)
from inat_classifier.metrics import print_most_confused, print_report, write_confusion
from inat_classifier.storage import (
    atomic_write,
    atomic_write_text,
    check_writable_folder,
    is_matplotlib_png,
    json_with_keys,
    refuse_foreign,
    starts_with_line,
)
from inat_classifier.tracking import log_to_wandb
from models import restore_model

TOP_K = 3
CSV_HEADER = ["path"] + [c for i in range(1, TOP_K + 1) for c in (f"class_{i}", f"prob_{i}")]
# An existing --csv file is replaced only when it is a predictions CSV (this header as its first line),
# an existing eval.json only when it holds these keys, a confusion_matrix.png only when matplotlib wrote it.
is_predictions_csv = starts_with_line(",".join(CSV_HEADER))
is_eval_json = json_with_keys({"accuracy", "confusion_matrix", "checkpoint", "split"})


def write_predictions_csv(rows: list[dict], out: Path) -> None:
    """One row per image: path, then class and probability of each of the top k (written atomically)."""
    refuse_foreign(out, is_predictions_csv, "a predictions CSV", "--csv")

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER)
            for r in rows:
                writer.writerow([r["path"]] + [v for name, p in r["top"] for v in (name, f"{p:.6f}")])

    atomic_write(out, write, 200 * len(rows), "the predictions CSV")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Evaluate a checkpoint on the held-out split, or predict images."
    )
    add_flag(
        parser,
        "ckpt",
        required=True,
        help="checkpoint file (best.pt or last.pt), its run folder, or a model from export.py (.onnx, .torchscript.pt)",
    )
    add_flag(parser, "data_dir", default=None, help="dataset root (default: the one the run trained on)")
    add_flag(
        parser,
        "split",
        default="test",
        choices=("test", "val"),
        help="test = the held-out val/ or test/ folder; val = the run's own validation split (default: %(default)s)",
    )
    add_flag(
        parser,
        "out",
        default=None,
        help="folder for eval.json and confusion_matrix.png (default: beside the checkpoint)",
    )
    add_bool(parser, "tta", False, "average predictions over the image and its horizontal mirror")
    add_bool(
        parser,
        "wandb",
        False,
        "also log the figures (test accuracy, macro F1, ECE, NLL, Brier) and the confusion matrix to W&B, "
        "if the run used W&B (offline without an API key)",
    )
    add_bool(
        parser,
        "calibrate",
        False,
        "fit a temperature on the run's validation split (never the test split), store it in the checkpoint, "
        "and report calibration on --split before and after",
    )
    parser.add_argument("--predict", nargs="+", metavar="PATH", help="image files or folders: print the top 3 classes")
    add_flag(parser, "csv", default=None, help="with --predict: also write the predictions to this CSV file")
    add_flag(parser, "batch_size", type=int, default=128, help="batch size (default: %(default)s)")
    add_flag(
        parser,
        "workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="data loading processes (default: %(default)s)",
    )
    add_flag(parser, "device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    return parser


def predict_files(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device) -> dict:
    """--predict: the top 3 classes of every image file, printed (and written to --csv)."""
    files = collect_images(args.predict)
    if args.csv:
        check_writable_folder(Path(args.csv).absolute().parent, "give --csv a path in a folder you can write")
    rows = top_classes(model, ckpt, files, device, batch_size=args.batch_size, workers=args.workers)
    if not rows:
        raise UserError(
            f"--predict: none of the {len(files)} image files could be read"
            + (f"; {args.csv} left as it was" if args.csv else "")
        )
    for r in rows:
        print(f"{r['path']}: " + ", ".join(f"{name} {p:.3f}" for name, p in r["top"]))
    if args.csv:
        write_predictions_csv(rows, Path(args.csv))
        print(f"wrote {args.csv}")
    return {"predictions": rows}


def check_args(args: argparse.Namespace) -> None:
    """Flags that cannot work together, refused before the checkpoint is even read."""
    if args.csv and not args.predict:
        raise UserError("--csv writes the predictions of --predict; add --predict FILES, or drop --csv")
    if args.csv and Path(args.csv).is_dir():
        raise UserError(f"--csv {args.csv} is a folder; give a file name such as predictions.csv")
    if args.calibrate and args.predict:
        raise UserError("--calibrate fits on the run's validation split; run it without --predict first")
    if args.calibrate and args.split == "val":
        raise UserError("--calibrate fits on the validation split, so it reports on --split test only")
    if args.calibrate and exported_format(args.ckpt):
        raise UserError("--calibrate needs the checkpoint: calibrate best.pt, then export it again")
    if args.csv:
        refuse_foreign(Path(args.csv), is_predictions_csv, "a predictions CSV", "--csv")
    if args.batch_size < 1 or args.workers < 0:
        raise UserError(f"--batch_size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")


def checkpoint_file(ckpt_arg: str) -> Path:
    path = Path(ckpt_arg)
    return path / "best.pt" if path.is_dir() else path


def calibrate(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device) -> float:
    """--calibrate: the temperature that minimises NLL on the run's validation split, stored in the checkpoint."""
    if not ckpt.get("split"):
        raise UserError(
            "--calibrate fits the temperature on the run's validation split, and this checkpoint saved none "
            "(trained without one?); it never fits on the test split"
        )
    samples, _ = heldout_samples(ckpt, args.data_dir, "val")
    if not samples:
        raise UserError("--calibrate: the run's validation split is empty; train with a validation split first")
    p = predict_readable(model, samples, preprocess_of(ckpt), device, args.batch_size, args.workers)
    temperature = fit_temperature(p.outputs, p.targets)
    path = checkpoint_file(args.ckpt)
    atomic_torch_save({**ckpt, "temperature": temperature}, path)
    print(f"calibration: temperature {temperature:.4f} fitted on {len(p.targets)} validation images, stored in {path}")
    return temperature


def print_calibration(metrics: dict, p: Predictions, old_temperature: float, calibrated: bool) -> None:
    """ECE, NLL and Brier score; with --calibrate, ECE and NLL before the new temperature too."""
    print(f"calibration (ECE over {metrics['ece_bins']} equal-width confidence bins):")
    if calibrated:
        before = calibration_metrics(p.tempered(old_temperature).outputs, p.targets)
        print(f"  before, temperature {old_temperature:.4f}: ECE {before['ece']:.4f}  NLL {before['nll']:.4f}")
    label = "after, " if calibrated else ""
    print(
        f"  {label}temperature {metrics['temperature']:.4f}: ECE {metrics['ece']:.4f}  NLL {metrics['nll']:.4f}  "
        f"Brier {metrics['brier']:.4f}"
    )


def output_folder(args: argparse.Namespace) -> Path:
    """The folder of eval.json and confusion_matrix.png, checked before the evaluation: it can be
    written, and what it holds under those names is an earlier evaluation's (refuse_foreign)."""
    out = Path(args.out) if args.out else Path(args.ckpt).parent if Path(args.ckpt).is_file() else Path(args.ckpt)
    hint = "choose another --out" if args.out else "pass --out DIR to write eval.json and the figure elsewhere"
    created = not out.exists()
    check_writable_folder(out, hint)
    if created:  # made for the results: gone again if the evaluation fails
        on_failure(lambda interrupted: None if any(out.iterdir()) else out.rmdir())
    refuse_foreign(out / "eval.json", is_eval_json, "an evaluation's eval.json")
    refuse_foreign(out / "confusion_matrix.png", is_matplotlib_png, "a figure")
    return out


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    device = select_device(args.device)
    model, ckpt = load_exported(args.ckpt) if exported_format(args.ckpt) else restore_model(args.ckpt, device)
    if args.predict:
        return predict_files(args, FlipTTA(model) if args.tta else model, ckpt, device)
    out = output_folder(args)  # checked before any work, the calibration's included
    old_temperature = temperature_of(ckpt)
    if args.calibrate:  # on the model's own logits, with or without --tta
        ckpt["temperature"] = calibrate(args, model, ckpt, device)
    if args.tta:
        model = FlipTTA(model)
    data_dir = run_data_dir(ckpt, args.data_dir)
    samples, split_name = heldout_samples(ckpt, data_dir, args.split)
    p = predict_readable(model, samples, preprocess_of(ckpt), device, args.batch_size, args.workers)
    metrics = evaluate_predictions(p.tempered(temperature_of(ckpt)), ckpt["class_names"])
    metrics.update(
        checkpoint=str(args.ckpt),
        split=split_name,
        data_dir=str(data_dir),
        tta=args.tta,
        epoch=ckpt.get("epoch"),
        temperature=temperature_of(ckpt),
    )
    print_report(metrics, f"{args.ckpt} on {split_name}: {metrics['n']} images")
    print_most_confused(metrics["most_confused"])
    print_calibration(metrics, p, old_temperature, args.calibrate)
    atomic_write_text(out / "eval.json", json.dumps(metrics, indent=1))
    confusion = write_confusion(metrics, ckpt["class_names"], out, split_name)
    print(f"wrote {out / 'eval.json'} and {confusion}")
    if args.wandb:
        summary = {f"test_{k}": metrics[k] for k in ("accuracy", "macro_f1", "ece", "nll", "brier")}
        log_to_wandb("eval", ckpt.get("config", {}), out, {"confusion_matrix": confusion}, summary)
    return metrics


if __name__ == "__main__":
    run_cli(main, get_args_parser())
