"""Which parts of a model train: stages, freeze strategies, frozen batch norm, the train mode that respects it."""

from __future__ import annotations

from torch import nn


def has_params(m: nn.Module) -> bool:
    """Whether the module holds any parameter (its own or its children's)."""
    return any(True for _ in m.parameters())


BODY_CONTAINERS = (
    "features",
    "blocks",
    "stages",
    "layers",
)  # one Sequential holding the whole body (torchvision, timm)


def list_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level children with parameters, in order.

    A model whose body is one big Sequential (`features` in EfficientNet, MobileNet, ConvNeXt, VGG;
    `blocks` in timm) has that Sequential's children listed instead, so `last:K` stays meaningful.
    """
    stages = [(n, m) for n, m in model.named_children() if has_params(m)]
    few = len(stages) < 4
    if few or any(n in BODY_CONTAINERS for n, _ in stages):
        expanded = []
        for n, m in stages:
            if isinstance(m, nn.Sequential) and n != stages[-1][0] and (few or n in BODY_CONTAINERS):
                expanded.extend((f"{n}.{c}", cm) for c, cm in m.named_children() if has_params(cm))
            else:
                expanded.append((n, m))
        stages = expanded
    return stages


def apply_freeze(model: nn.Module, strategy: str, head_name: str) -> None:
    """Set requires_grad for all, none, upto:NAME or last:K; the new head always trains."""
    stages = list_stages(model)
    head_stage = next(i for i, (n, _) in enumerate(stages) if head_name == n or head_name.startswith(n + "."))
    trainable = trainable_stages([n for n, _ in stages], strategy, head_stage)
    for p in model.parameters():
        p.requires_grad = strategy == "none"
    for name, m in stages:
        if name in trainable:
            for p in m.parameters():
                p.requires_grad = True
    for p in model.get_submodule(head_name).parameters():
        p.requires_grad = True


def trainable_stages(names: list[str], strategy: str, head_stage: int) -> set[str]:
    """The stages a --freeze strategy leaves trainable (head_stage: the index of the head's stage)."""
    if strategy == "none":
        return set(names)
    if strategy == "all":
        return set()
    if strategy.startswith("upto:"):
        stop = strategy[5:]
        if stop not in names:
            raise ValueError(f"--freeze upto:{stop}: no such stage; stages are {', '.join(names)}")
        return set(names[names.index(stop) + 1 :])
    if strategy.startswith("last:"):
        try:
            k = int(strategy[5:])
        except ValueError:
            raise ValueError(f"--freeze {strategy}: K must be an integer") from None
        body = names[:head_stage]
        if not 0 <= k <= len(body):
            raise ValueError(
                f"--freeze {strategy}: K must be in 0..{len(body)}, the stages before the head "
                f"({', '.join(body)}); --freeze none trains everything"
            )
        return set(body[len(body) - k :] if k else []) | set(names[head_stage:])
    raise ValueError(f"unknown --freeze '{strategy}'; use all, none, upto:STAGE or last:K")


def freeze_batchnorm(model: nn.Module, head_name: str) -> None:
    """Freeze the body's batch-norm layers (affine and running statistics).

    With no trainable parameters, set_train_mode keeps them in eval mode, so small batches of a new
    dataset (and their augmentation) never overwrite the statistics the backbone was trained with,
    as in detection fine-tuning (FrozenBatchNorm2d) and Keras' fine-tuning guide.
    """
    head = model.get_submodule(head_name)
    in_head = {id(m) for m in head.modules()}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in in_head:
            for p in m.parameters():
                p.requires_grad = False


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def set_train_mode(model: nn.Module) -> None:
    """train(), but every frozen part (all its parameters frozen) stays in eval mode.

    Frozen batch norm keeps its running statistics, and a frozen body runs deterministically
    (no dropout or stochastic depth), exactly as when its features are cached.
    """
    model.train()
    for m in model.modules():
        if m is model:
            continue
        flags = [p.requires_grad for p in m.parameters()]
        if flags and not any(flags):
            m.eval()
