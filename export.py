"""Export a checkpoint as one ONNX or TorchScript file: uint8 images in, probabilities out, checked on real photos.

python export.py --ckpt runs/<run>/best.pt --format onnx          # writes runs/<run>/best.onnx
python export.py --ckpt runs/<run>/best.pt --format torchscript   # writes runs/<run>/best.torchscript.pt

The file takes uint8 RGB images, N x S x S x 3 at the checkpoint's input size S, resized and
centre-cropped as evaluation crops them; inside are the normalisation, the model and the softmax
(of the logits divided by the checkpoint's temperature). Its metadata holds the class names, the
input size and mean/std. Before it is written it is run beside the checkpoint on the run's held-out
photos: a difference in probability over 1e-4 is an error, and nothing is written.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C or SIGTERM meanwhile is one line (startup.py)
    from inat_classifier import startup

    startup.stop_quietly()

import argparse
from pathlib import Path

import torch

from inat_classifier.checkpoint import EXPORT_NAMES, exported_format
from inat_classifier.cli import UserError, add_flag, run_cli
from inat_classifier.exported import OPSET, SUFFIXES, TOLERANCE, Agreement, export_checked, require
from inat_classifier.inference import heldout_samples, run_data_dir
from inat_classifier.storage import format_bytes
from models import restore_model


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Export a checkpoint as an ONNX or TorchScript file that takes uint8 images and returns "
        "probabilities, checked against the checkpoint on the run's held-out photos.",
    )
    add_flag(parser, "ckpt", required=True, help="checkpoint file (best.pt or last.pt) or its run folder")
    add_flag(parser, "format", default="onnx", choices=tuple(SUFFIXES), help="file format (default: %(default)s)")
    add_flag(
        parser,
        "out",
        default=None,
        help="file to write (default: beside the checkpoint, best.onnx or best.torchscript.pt)",
    )
    add_flag(parser, "data_dir", default=None, help="dataset root for the check (default: the one the run trained on)")
    add_flag(
        parser,
        "check_images",
        type=int,
        default=64,
        help="held-out photos the export is checked on; 0 writes it unchecked (default: %(default)s)",
    )
    add_flag(parser, "opset", type=int, default=OPSET, help="ONNX opset version (default: %(default)s)")
    return parser


def output_path(args: argparse.Namespace) -> Path:
    """--out, or the checkpoint's name with the format's suffix beside it; never a file export.py did not write."""
    ckpt = Path(args.ckpt)
    if args.out:
        out = Path(args.out)
    else:
        ckpt_file = ckpt / "best.pt" if ckpt.is_dir() else ckpt
        out = ckpt_file.with_name(ckpt_file.name.split(".")[0] + SUFFIXES[args.format])
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as model{SUFFIXES[args.format]}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    if out.exists() and exported_format(out) is None:
        raise UserError(f"{out} exists and is not an exported model; choose another --out (it is left as it is)")
    return out


def check_args(args: argparse.Namespace) -> None:
    """Flags and packages, before the checkpoint is read."""
    if args.check_images < 0:
        raise UserError(f"--check_images must be >= 0, got {args.check_images}")
    if args.format == "onnx":
        require("onnx", "--format onnx")
        if args.check_images:
            require("onnxruntime", "checking an ONNX export")


def check_photos(ckpt: dict, args: argparse.Namespace) -> list[str]:
    """Up to --check_images held-out photos of the run, spread over its classes."""
    if not args.check_images:
        return []
    try:
        samples, _ = heldout_samples(ckpt, args.data_dir, "test")
    except UserError as e:
        raise UserError(
            f"{e} (the export is checked on the run's held-out photos: give --data_dir, "
            "or --check_images 0 to write it unchecked)"
        ) from None
    step = max(1, len(samples) // args.check_images)
    return [path for path, _ in samples[::step][: args.check_images]]


def report(agreement: Agreement | None, ckpt: dict, args: argparse.Namespace) -> None:
    if agreement is None:
        print("not checked against the checkpoint (--check_images 0)")
        return
    a = agreement
    print(
        f"check on {a.n} held-out photos of {run_data_dir(ckpt, args.data_dir)}: largest difference in "
        f"probability {a.max_diff:.2e} (limit {TOLERANCE:g}), top-1 agreement {a.same_top1}/{a.n} "
        f"({a.same_top1 / a.n:.1%})"
    )


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    out = output_path(args)
    model, ckpt = restore_model(args.ckpt, torch.device("cpu"))
    photos = check_photos(ckpt, args)
    size = ckpt["preprocess"]["image_size"]
    print(
        f"exporting {args.ckpt} ({type(model).__name__}, {len(ckpt['class_names'])} classes) as "
        f"{EXPORT_NAMES[args.format]}: input uint8 N x {size} x {size} x 3, output probabilities"
    )
    agreement = export_checked(model, ckpt, Path(args.ckpt), args.format, out, photos, args.opset)
    report(agreement, ckpt, args)
    print(f"wrote {out} ({format_bytes(out.stat().st_size)})")
    result = {"out": str(out), "format": args.format}
    if agreement is not None:
        result.update(n=agreement.n, max_diff=agreement.max_diff, top1_agreement=agreement.same_top1 / agreement.n)
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
