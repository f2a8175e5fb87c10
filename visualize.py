"""Figures from a checkpoint: predictions, filters, feature maps, guided backprop, Grad-CAM, confusion, curves.

    python visualize.py predictions     --ckpt runs/<run>/best.pt              # 10x3 held-out grid
    python visualize.py predictions     --ckpt best.pt --per_class             # 3 images of every class
    python visualize.py filters         --ckpt best.pt [--layer features.2.0]
    python visualize.py feature_maps    --ckpt best.pt --image photo.jpg
    python visualize.py guided_backprop --ckpt best.pt --n 4 --neuron features.4:0-9
    python visualize.py gradcam         --ckpt best.pt --image a.jpg b.jpg [--layer layer4]
    python visualize.py confusion       --ckpt best.pt                         # confusion_matrix.png, as evaluate.py
    python visualize.py top_losses      --ckpt best.pt --n 12 [--cam]     # the held-out photos it gets most wrong
    python visualize.py calibration     --ckpt best.pt                     # reliability diagram
    python visualize.py curves          --run runs/<run1> runs/<run2>
    python visualize.py sweep           --sweep_dir sweeps/<sweep>            # report of a sweep (sweep/report.py)

Every command writes one PNG (default: into the checkpoint's folder) and prints its path; with
--wandb it is also logged to W&B, if the run itself used W&B. Images are shown un-normalised, in
their true colours, as the model saw them (resized and centre-cropped).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C or SIGTERM meanwhile is one line (startup.py)
    from inat_classifier import startup

    startup.stop_quietly()

import argparse
import functools
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from inat_classifier.attribution import (
    capture_outputs,
    conv_layer,
    conv_stages,
    grad_cam,
    guided_backprop,
    neuron_maps,
)
from inat_classifier.calibration import calibration_metrics, plot_reliability, temperature_of
from inat_classifier.checkpoint import preprocess_of
from inat_classifier.cli import UserError, add_bool, add_flag, run_cli
from inat_classifier.devices import select_device
from inat_classifier.failures import plot_top_losses, top_loss_panels
from inat_classifier.figures import (
    MIN_MAP_SIDE,
    gradient_image,
    maps_worth_showing,
    plot_feature_maps,
    plot_filters,
    plot_gradcam,
    plot_guided_backprop,
    plot_prediction_grid,
    unnormalize,
)
from inat_classifier.inference import evaluate_samples, heldout_samples, load_input, predict, predict_readable
from inat_classifier.metrics import write_confusion
from inat_classifier.runs import read_metrics_csv
from inat_classifier.sweep import report as sweep_report
from inat_classifier.tracking import log_figure, plot_curves, short_labels
from models import restore_model


# ----------------------------------------------------------------------------- small helpers
def label_from_path(path: str | Path, class_names: Sequence[str]) -> int | None:
    """The true class of an image inside a <class>/ folder, else None."""
    parent = Path(path).parent.name
    return list(class_names).index(parent) if parent in class_names else None


def output_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    ckpt = Path(args.ckpt)
    return ckpt if ckpt.is_dir() else ckpt.parent


# ----------------------------------------------------------------------------- samples
def choose_samples(
    samples: Sequence[tuple[str, int]], n: int, seed: int, per_class: int = 0, num_classes: int = 0
) -> list[tuple[str, int]]:
    """`n` random samples, or `per_class` of every class (classes in order); `seed` fixes the draw."""
    rng = random.Random(seed)
    if per_class:
        chosen = []
        for c in range(num_classes):
            of_class = [s for s in samples if s[1] == c]
            chosen.extend(rng.sample(of_class, min(per_class, len(of_class))))
        return chosen
    return rng.sample(list(samples), min(n, len(samples)))


def images_for(args: argparse.Namespace, ckpt: dict) -> tuple[torch.Tensor, list[int | None], list[str]]:
    """The inputs of a per-image command: --image files, else --n held-out images chosen by --seed."""
    if args.image:
        paths = list(args.image)
        labels = [label_from_path(p, ckpt["class_names"]) for p in paths]
    else:
        if args.n < 1:
            raise UserError(f"--n must be >= 1, got {args.n}")
        samples, _ = heldout_samples(ckpt, args.data_dir, args.split)
        chosen = choose_samples(samples, args.n, args.seed)
        paths, labels = [p for p, _ in chosen], [y for _, y in chosen]
    preprocess = preprocess_of(ckpt)
    return torch.stack([load_input(p, preprocess) for p in paths]), labels, paths


# ----------------------------------------------------------------------------- predictions
def prediction_samples(
    model: nn.Module, ckpt: dict, samples: Sequence[tuple[str, int]], device: torch.device, batch_size: int = 64
) -> list[dict]:
    """The model on `samples` via inference.predict: per readable sample path, image (normalised),
    true, pred, confidence, correct; unreadable files are reported and skipped."""
    samples = list(samples)
    preprocess = preprocess_of(ckpt)
    p = predict(model, samples, preprocess, device, batch_size).tempered(temperature_of(ckpt))
    records = []
    if len(p.index) == 0:
        return records
    conf, pred = p.probs.max(1)
    for j, i in enumerate(p.index.tolist()):
        path, label = samples[i]
        records.append(
            {
                "path": path,
                "true": int(label),
                "image": load_input(path, preprocess),
                "pred": int(pred[j]),
                "confidence": float(conf[j]),
                "correct": int(pred[j]) == int(label),
            }
        )
    return records


def cmd_predictions(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device) -> Path:
    if args.rows < 1 or args.cols < 1:
        raise UserError(f"--rows and --cols must be >= 1, got {args.rows} and {args.cols}")
    samples, split_name = heldout_samples(ckpt, args.data_dir, args.split)
    chosen = choose_samples(
        samples,
        args.rows * args.cols,
        args.seed,
        per_class=args.cols if args.per_class else 0,
        num_classes=len(ckpt["class_names"]),
    )
    records = prediction_samples(model, ckpt, chosen, device)
    if not records:
        raise UserError("no readable held-out images to show")
    out = output_dir(args) / ("predictions_per_class.png" if args.per_class else "predictions.png")
    plot_prediction_grid(
        records,
        ckpt["class_names"],
        preprocess_of(ckpt),
        out,
        args.cols,
        f"Predictions on {split_name} images (seed {args.seed})",
        args.dpi,
    )
    return out


# ----------------------------------------------------------------------------- filters, feature maps
def cmd_filters(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device) -> Path:
    name, conv = conv_layer(model, args.layer)
    w = conv.weight
    kind = (
        "RGB, each filter min-max normalised"
        if w.shape[1] == 3
        else f"mean over {w.shape[1]} input channels, red +, blue -, each filter normalised"
    )
    shown = w.shape[0] if args.max_filters <= 0 else min(w.shape[0], args.max_filters)
    title = (
        f"{name}: {shown}{'' if shown == w.shape[0] else f' of {w.shape[0]}'} filters of "
        f"{w.shape[2]}x{w.shape[3]}x{w.shape[1]} ({kind})"
    )
    out = output_dir(args) / f"filters_{name.replace('.', '_')}.png"
    plot_filters(w, out, title, args.max_filters, args.dpi)
    return out


def cmd_feature_maps(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device) -> Path:
    preprocess = preprocess_of(ckpt)
    if args.image:
        path = args.image
    else:
        samples, _ = heldout_samples(ckpt, args.data_dir, args.split)
        path = choose_samples(samples, 1, args.seed)[0][0]
    x = load_input(path, preprocess)
    if args.channels < 1:
        raise UserError(f"--channels must be >= 1, got {args.channels}")
    names = args.layers or conv_stages(model)
    if not names:
        raise UserError("found no conv stages in the model; name them with --layers")
    outputs, logits = capture_outputs(model, x.unsqueeze(0).to(device), names)
    maps = {n: o for n, o in outputs.items() if o is not None and o.ndim == 4}
    skipped = [n for n in names if n not in maps]
    if skipped:
        print(f"note: skipped layers without a 4-D feature map output: {', '.join(skipped)}")
    if not maps:
        raise UserError("none of the layers gives a 4-D feature map")
    maps, small = maps_worth_showing({n: maps[n] for n in names if n in maps})
    too_small = f"left out {', '.join(small)}: maps under {MIN_MAP_SIDE}x{MIN_MAP_SIDE} have no layout to show"
    if not maps:
        raise UserError(f"{too_small}, and that is every layer; name earlier layers with --layers")
    if small:
        print(f"note: {too_small}")
    p = logits.softmax(1)[0]
    pred = int(p.argmax())
    title = (
        f"Feature maps of {Path(path).name} (predicted {ckpt['class_names'][pred]}, {p[pred]:.0%}): "
        f"the {args.channels} most active channels per layer" + (f"\n({too_small})" if small else "")
    )
    out = output_dir(args) / f"feature_maps_{Path(path).stem}.png"
    plot_feature_maps(x, maps, preprocess, out, title, args.channels, args.dpi)
    return out


# ----------------------------------------------------------------------------- guided backprop, Grad-CAM
def guided_backprop_rows(
    args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device
) -> list[list[tuple[torch.Tensor, str]]]:
    """The panels of guided_backprop.png, a row per image: the image, its class's map, each --neuron's map."""
    x, labels, paths = images_for(args, ckpt)
    x = x.to(device)
    names, preprocess = ckpt["class_names"], preprocess_of(ckpt)
    neurons = neuron_maps(model, x, args.neuron, args.reduce)
    grads, logits = guided_backprop(model, x, reduce=args.reduce)
    probs = logits.float().softmax(1).cpu()
    rows = []
    for r, path in enumerate(paths):
        pred = int(probs[r].argmax())
        true = f"true: {names[labels[r]]}\n" if labels[r] is not None else f"{Path(path).name[:28]}\n"
        panels = [
            (
                unnormalize(x[r].cpu(), preprocess.mean, preprocess.std),
                f"{true}pred: {names[pred]} ({probs[r, pred]:.0%})",
            ),
            (gradient_image(grads[r], preprocess.std), f"guided backprop\nfor '{names[pred]}'"),
        ]
        for (layer, index), g, act, fired in neurons:
            dead = "" if fired[r] else "never fires on this image (dead)\n"
            panels.append(
                (gradient_image(g[r], preprocess.std), f"neuron {layer}[{index}]\n{dead}{args.reduce} act {act[r]:.2f}")
            )
        rows.append(panels)
    for (layer, index), _, _, fired in neurons:
        if not fired.all():
            print(
                f"note: neuron {layer}[{index}] never fires on {int((~fired).sum())} of {len(paths)} images (dead "
                "there): no pixel raises it, so its panel is plain grey"
            )
    return rows


def cmd_guided_backprop(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device) -> Path:
    out = output_dir(args) / "guided_backprop.png"
    plot_guided_backprop(guided_backprop_rows(args, model, ckpt, device), out, args.dpi)
    return out


def cmd_gradcam(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device) -> Path:
    x, labels, paths = images_for(args, ckpt)
    cams, logits, layer = grad_cam(model, x.to(device), layer=args.layer)
    probs = logits.softmax(1)
    names, preprocess = ckpt["class_names"], preprocess_of(ckpt)
    pairs = []
    for i, path in enumerate(paths):
        pred = int(probs[i].argmax())
        true = f"true: {names[labels[i]]}" if labels[i] is not None else Path(path).name[:28]
        pairs.append(
            (
                unnormalize(x[i], preprocess.mean, preprocess.std),
                cams[i],
                true,
                f"Grad-CAM for '{names[pred]}' ({probs[i, pred]:.0%})",
            )
        )
    out = output_dir(args) / "gradcam.png"
    plot_gradcam(pairs, layer, out, args.dpi)
    return out


# ----------------------------------------------------------------------------- confusion
def cmd_confusion(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device) -> Path:
    samples, split_name = heldout_samples(ckpt, args.data_dir, args.split)
    metrics = evaluate_samples(model, ckpt, samples, device, args.batch_size, args.workers)
    return write_confusion(metrics, ckpt["class_names"], output_dir(args), split_name)


# ----------------------------------------------------------------------------- top losses, calibration
def heldout_predictions(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device):
    """The held-out samples, their split's name and the model's predictions on them (with the temperature)."""
    samples, split_name = heldout_samples(ckpt, args.data_dir, args.split)
    p = predict_readable(model, samples, preprocess_of(ckpt), device, args.batch_size, args.workers)
    return samples, split_name, p.tempered(temperature_of(ckpt))


def cmd_top_losses(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device) -> Path:
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    samples, split_name, p = heldout_predictions(args, model, ckpt, device)
    panels, x = top_loss_panels(p, samples, preprocess_of(ckpt), args.n)
    if args.cam:
        for panel, cam in zip(panels, grad_cam(model, x.to(device))[0], strict=True):
            panel["cam"] = cam
    names = ckpt["class_names"]
    for panel in panels:
        print(f"loss {panel['loss']:7.3f}  true {names[panel['true']]}  pred {names[panel['pred']]} "
              f"({panel['prob']:.0%})  {panel['path']}")  # fmt: skip
    out = output_dir(args) / "top_losses.png"
    title = f"The {len(panels)} {split_name} photos with the highest loss (of {len(p.targets)})"
    plot_top_losses(panels, names, title + (", Grad-CAM of the prediction" if args.cam else ""), out, args.dpi)
    return out


def cmd_calibration(args: argparse.Namespace, model: nn.Module, ckpt: dict, device: torch.device) -> Path:
    _, split_name, p = heldout_predictions(args, model, ckpt, device)
    metrics = calibration_metrics(p.outputs, p.targets)
    out = output_dir(args) / "calibration.png"
    title = f"Reliability on {split_name}, {len(p.targets)} images, temperature {temperature_of(ckpt):.3g}"
    plot_reliability(metrics, title, out, args.dpi)
    print(
        f"ECE {metrics['ece']:.4f} ({metrics['ece_bins']} bins)  NLL {metrics['nll']:.4f}  Brier {metrics['brier']:.4f}"
    )
    return out


# ----------------------------------------------------------------------------- curves
def cmd_curves(args: argparse.Namespace) -> Path:
    histories, dirs = {}, []
    for run in args.run:
        path = Path(run)
        csv_path = path if path.is_file() else path / "metrics.csv"
        if not csv_path.is_file():
            raise UserError(f"--run: no metrics.csv in {run}")
        try:
            hist = read_metrics_csv(csv_path)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{csv_path}: not a metrics.csv written by training ({e})") from None
        if not hist or any(not {"epoch", "train_loss", "val_loss", "train_acc", "val_acc"} <= set(h) for h in hist):
            raise UserError(f"{csv_path}: no epochs with train/val loss and accuracy")
        dirs.append(csv_path.parent)
    labels = short_labels([d.name for d in dirs])
    for label, d in zip(labels, dirs, strict=True):
        histories[label] = read_metrics_csv(d / "metrics.csv")
    if args.out:
        out = Path(args.out) / ("curves.png" if len(dirs) == 1 else "curves_compare.png")
    else:
        out = dirs[0] / "curves.png" if len(dirs) == 1 else dirs[0].parent / "curves_compare.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(histories, out)
    return out


# ----------------------------------------------------------------------------- W&B
def run_config(args: argparse.Namespace, ckpt: dict | None) -> dict:
    if ckpt is not None:
        return ckpt.get("config", {})
    for run in getattr(args, "run", None) or []:
        p = Path(run)
        f = (p.parent if p.is_file() else p) / "args.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError):
                pass
    return {}


# ----------------------------------------------------------------------------- CLI
COMMANDS = ("predictions", "filters", "feature_maps", "guided_backprop", "gradcam", "confusion", "top_losses",
            "calibration", "curves", "sweep")  # fmt: skip


def add_image_flags(p: argparse.ArgumentParser, n_default: int) -> None:
    """--image files, or --n held-out images: the inputs of guided_backprop and gradcam."""
    p.add_argument("--image", nargs="+", metavar="PATH", help="image file(s) to explain (default: --n held-out images)")
    add_flag(
        p,
        "n",
        type=int,
        default=n_default,
        help="without --image: this many held-out images, drawn by --seed (default: %(default)s)",
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Figures from a trained checkpoint (one PNG per command).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'python visualize.py COMMAND -h' for the flags of one command.",
    )
    common = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    g = common.add_argument_group("common")
    add_flag(
        g, "out", default=None, help="folder for the PNG (default: the checkpoint's folder; sweep: SWEEP_DIR/report)"
    )
    add_flag(g, "dpi", type=int, default=110, help="resolution of the PNG (default: %(default)s)")
    add_bool(g, "wandb", False, "also log the figure to W&B, if the run used W&B (offline without an API key)")

    model_common = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    g = model_common.add_argument_group("checkpoint and data")
    add_flag(g, "ckpt", required=True, help="checkpoint file (best.pt or last.pt) or its run folder")
    add_flag(g, "data_dir", default=None, help="dataset root (default: the one the run trained on)")
    add_flag(
        g,
        "split",
        default="test",
        choices=("test", "val"),
        help="held-out images: test = the val/ or test/ folder; val = the run's validation split "
        "(default: %(default)s)",
    )
    add_flag(g, "seed", type=int, default=0, help="which held-out images are drawn (default: %(default)s)")
    add_flag(g, "device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")

    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False),
    )
    p = sub.add_parser(
        "predictions",
        parents=[model_common, common],
        help="grid of held-out predictions",
        description="Held-out images titled with true and predicted class and confidence; "
        "wrong predictions framed red, right ones green.",
    )
    add_flag(p, "rows", type=int, default=10, help="grid rows (default: %(default)s)")
    add_flag(p, "cols", type=int, default=3, help="grid columns (default: %(default)s)")
    add_bool(p, "per_class", False, "one row per class with --cols images of it, so every class shows")

    p = sub.add_parser(
        "filters",
        parents=[model_common, common],
        help="conv filters as a grid",
        description="The first conv layer's filters in colour, or another conv layer's (input channels averaged).",
    )
    add_flag(
        p,
        "layer",
        default=None,
        help="module name of a conv layer (or a block: its first conv), from model.named_modules() "
        "(default: the first Conv2d)",
    )
    add_flag(
        p, "max_filters", type=int, default=64, help="show at most this many filters; 0 = all (default: %(default)s)"
    )

    p = sub.add_parser(
        "feature_maps",
        parents=[model_common, common],
        help="activations of each conv stage for one image",
        description="The most active channels of every conv stage's output for one image.",
    )
    add_flag(p, "image", default=None, help="image file (default: one held-out image drawn by --seed)")
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="module names to show (default: the conv stages, e.g. features.0 .. features.4)",
    )
    add_flag(p, "channels", type=int, default=8, help="channels shown per layer (default: %(default)s)")

    p = sub.add_parser(
        "guided_backprop",
        parents=[model_common, common],
        help="guided backpropagation maps",
        description="Guided backpropagation for the predicted class and for chosen neurons.",
    )
    add_image_flags(p, 4)
    p.add_argument(
        "--neuron",
        nargs="+",
        metavar="LAYER:INDEX",
        help="also excite these neurons: LAYER:INDEX, LAYER:FIRST-LAST, or INDEX of the last conv "
        "stage (e.g. features.4:0-9)",
    )
    add_flag(
        p,
        "reduce",
        default="max",
        choices=("max", "sum"),
        help="a neuron's score: its strongest unit (max) or its whole map (sum) (default: %(default)s)",
    )

    p = sub.add_parser(
        "gradcam",
        parents=[model_common, common],
        help="Grad-CAM heat maps",
        description="Grad-CAM heat maps for the predicted class over the image.",
    )
    add_image_flags(p, 6)
    add_flag(p, "layer", default=None, help="module name whose 4-D output is used (default: the last conv stage)")

    for name, help_text, description in (
        ("confusion", "confusion matrix on the held-out split",
         "Confusion matrix normalised per true class over the held-out split, as confusion_matrix.png "
         "(the figure and file name evaluate.py writes)."),
        ("top_losses", "the held-out photos with the highest loss",
         "The held-out photos whose true class gets the lowest probability (highest cross-entropy), "
         "titled with the true class, the prediction, its probability and the loss."),
        ("calibration", "reliability diagram on the held-out split",
         "Accuracy against confidence in 15 equal-width bins, with the photos per bin and the ECE."),
    ):  # fmt: skip
        p = sub.add_parser(name, parents=[model_common, common], help=help_text, description=description)
        add_flag(p, "batch_size", type=int, default=128, help="batch size (default: %(default)s)")
        add_flag(
            p,
            "workers",
            type=int,
            default=min(4, os.cpu_count() or 1),
            help="data loading processes (default: %(default)s)",
        )
        if name == "top_losses":
            add_flag(p, "n", type=int, default=12, help="how many photos (default: %(default)s)")
            add_bool(p, "cam", False, "draw the Grad-CAM heat map of the predicted class over each photo")

    p = sub.add_parser(
        "curves",
        parents=[common],
        help="loss and accuracy curves of one or more runs",
        description="Loss and accuracy per epoch from metrics.csv; several runs overlaid.",
    )
    p.add_argument(
        "--run",
        nargs="+",
        required=True,
        metavar="RUN_DIR",
        help="run folders (or their metrics.csv); default output: the run folder, or the first "
        "run's parent folder for several runs",
    )

    p = sub.add_parser(
        "sweep",
        parents=[common],
        help="report of a hyperparameter sweep (its Optuna study)",
        description=sweep_report.DESCRIPTION,
    )
    sweep_report.add_flags(p)
    return parser


def main(args: argparse.Namespace) -> Path | dict:
    if args.dpi < 20:
        raise UserError(f"--dpi must be >= 20, got {args.dpi}")
    if args.command == "sweep":  # no checkpoint: the report reads the study and run folders
        return sweep_report.main(args)
    ckpt = None
    if args.command == "curves":
        out = cmd_curves(args)
    else:
        device = select_device(args.device)
        model, ckpt = restore_model(args.ckpt, device)
        out = {
            "predictions": cmd_predictions,
            "filters": cmd_filters,
            "feature_maps": cmd_feature_maps,
            "guided_backprop": cmd_guided_backprop,
            "gradcam": cmd_gradcam,
            "confusion": cmd_confusion,
            "top_losses": cmd_top_losses,
            "calibration": cmd_calibration,
        }[args.command](args, model, ckpt, device)
    print(f"wrote {out}")
    if args.wandb:
        log_figure(args.command, out, run_config(args, ckpt), out.parent)
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
