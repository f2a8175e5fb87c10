"""Part A: train the flexible from-scratch ConvNet on a folder-per-class dataset.

python train_parta.py --filters 32 --activation relu
python train_parta.py --resume runs/<run>
python train_parta.py --config runs/<run>/args.json --epochs 30   # its flags, trained longer, in a new run
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C or SIGTERM meanwhile is one line (startup.py)
    from inat_classifier import startup

    startup.stop_quietly()

import argparse

import torch

from inat_classifier import engine
from inat_classifier.checkpoint import TrainState, checkpoint_meta
from inat_classifier.class_balance import split_balance_line
from inat_classifier.cli import UserError, add_bool, add_flag, run_cli
from inat_classifier.config_file import parse_args
from inat_classifier.device_batches import image_loaders, stored_preprocess
from inat_classifier.flags import add_training_args, check_common_args
from inat_classifier.model_info import check_memory, class_count, print_table
from inat_classifier.optim import param_groups_with_decay
from inat_classifier.presets import Preprocess
from inat_classifier.runs import setup_run
from models import ACTIVATIONS, ConvNet, convnet_spec, count_complexity, format_count

DEFAULTS = dict(
    image_size=224,
    batch_size=64,
    epochs=20,
    lr=1e-3,
    optimizer="adamw",
    weight_decay=0.05,
    scheduler="cosine",
    warmup_epochs=1.0,
    label_smoothing=0.1,
    augment=True,
    crop_scale=0.5,
    wandb_project="inat12k-parta",
)


def parse_kernel_size(value: str) -> list[int] | int:
    """'3' or '7,5,3,3,3' (one per block)."""
    try:
        sizes = [int(v) for v in str(value).replace(" ", "").strip("[]").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"kernel size must be an int or a comma list like 7,5,3,3,3, got '{value}'"
        ) from None
    if not sizes:
        raise argparse.ArgumentTypeError("kernel size is empty")
    return sizes[0] if len(sizes) == 1 else sizes


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="train_parta.py", description="Train the from-scratch CNN (Part A)."
    )
    g = parser.add_argument_group("model")
    add_flag(g, "filters", type=int, default=64, help="filters in the first conv block (default: %(default)s)")
    add_flag(
        g,
        "filter_org",
        type=float,
        default=1.5,
        help="filter factor from block to block: 1 same, 2 doubling, 0.5 halving (default: %(default)s)",
    )
    add_flag(g, "conv_layers", type=int, default=5, help="number of conv blocks (default: %(default)s)")
    add_flag(
        g,
        "kernel_size",
        type=parse_kernel_size,
        default=3,
        help="kernel size, one int or one per block like 7,5,3,3,3 (default: %(default)s)",
    )
    add_flag(
        g,
        "activation",
        default="gelu",
        choices=tuple(ACTIVATIONS),
        help="activation after every conv and the dense layer (default: %(default)s)",
    )
    add_bool(g, "batch_norm", True, "batch normalisation after every conv")
    add_flag(
        g, "dropout", type=float, default=0.1, help="dropout before and after the dense layer (default: %(default)s)"
    )
    add_flag(g, "dense_neurons", type=int, default=512, help="neurons in the hidden dense layer (default: %(default)s)")
    add_flag(
        g,
        "pool",
        default="avg",
        choices=("flatten", "avg"),
        help="flatten the last feature map, or global-average-pool it, before the dense layer (default: %(default)s)",
    )
    add_bool(
        g,
        "summary",
        False,
        "print the model layer by layer (output shape, parameters, MACs) and exit; "
        "needs no dataset (10 classes unless --data_dir holds one)",
    )
    add_training_args(parser, DEFAULTS)
    return parser


def run_name(args: argparse.Namespace) -> str:
    """A readable name from the hyperparameters a sweep varies."""
    ks = args.kernel_size if isinstance(args.kernel_size, int) else "-".join(map(str, args.kernel_size))
    return (
        f"parta-f{args.filters}x{args.filter_org:g}-l{args.conv_layers}-k{ks}-{args.activation}"
        f"-bn{int(args.batch_norm)}-do{args.dropout:g}-d{args.dense_neurons}-aug{int(args.augment)}"
        f"-bs{args.batch_size}-lr{args.lr:.0e}"
    )


def build_model(args: argparse.Namespace, num_classes: int) -> ConvNet:
    """The ConvNet the flags describe."""
    return ConvNet(
        num_classes=num_classes,
        image_size=args.image_size,
        conv_layers=args.conv_layers,
        filters=args.filters,
        filter_org=args.filter_org,
        kernel_size=args.kernel_size,
        activation=args.activation,
        batch_norm=args.batch_norm,
        dropout=args.dropout,
        dense_neurons=args.dense_neurons,
        pool=args.pool,
    )


def build_on_meta(args: argparse.Namespace, num_classes: int) -> ConvNet:
    """The ConvNet the flags describe, shapes only (no memory): to check the flags and what the model needs."""
    with torch.device("meta"):
        return build_model(args, num_classes)


def main(args: argparse.Namespace) -> TrainState | None:
    check_common_args(args)
    if args.dense_neurons < 1:
        raise UserError(f"--dense_neurons must be >= 1, got {args.dense_neurons}")
    if args.summary:
        print_table(build_model(args, class_count(args.data_dir)), args.image_size)
        return None
    setup = setup_run(args, run_name(args), get_args_parser(), validate=lambda n: build_on_meta(args, n))
    args = setup.args
    device = setup.device
    batch = min(setup.rank_batch_size, len(setup.train_samples))  # a batch never holds more than the split
    check_memory(build_on_meta(args, len(setup.classes)), args.image_size, batch, args, device)
    torch.manual_seed(args.seed)  # --seed fixes the initial weights too
    model = build_model(args, len(setup.classes))
    params, macs = count_complexity(model, args.image_size)
    print(
        f"ConvNet: {format_count(params)} parameters ({params:,}), {format_count(macs)} multiply-accumulates "
        f"per {args.image_size}x{args.image_size} image"
    )
    print(
        f"data: {setup.root} | {len(setup.classes)} classes | train {len(setup.train_samples)} | "
        f"val {len(setup.val_samples)} | device {device} | run {setup.run_dir}"
    )
    print(split_balance_line(setup.train_samples, setup.classes, args))
    model.to(device)
    preprocess = stored_preprocess(setup, Preprocess.for_size(args.image_size))
    train_loader, val_loader = image_loaders(setup, preprocess, device)
    groups = param_groups_with_decay(model.named_parameters(), args.lr, args.weight_decay, "model")
    meta = checkpoint_meta(
        convnet_spec(args, args.image_size),
        setup.classes,
        preprocess,
        setup.split,
        vars(args),
        params=params,
        macs=macs,
    )
    state = engine.fit(setup, model, train_loader, val_loader, groups, meta, device)
    engine.report(setup, state)
    return state


if __name__ == "__main__":
    run_cli(main, get_args_parser(), parse=parse_args)
