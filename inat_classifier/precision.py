"""Mixed precision: the autocast dtype a run uses, its GradScaler, and the precision a resumed run keeps."""

from __future__ import annotations

import torch

from inat_classifier.cli import UserError


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. auto: bf16 on CUDA GPUs that have it (Ampere and
    later, compute capability 8), fp16 with a GradScaler on older ones, full precision elsewhere."""
    if mode == "auto":  # bf16 needs no loss scaling: fewer kernels a step, no skipped steps
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if mode == "fp16":
        if device.type == "cpu":
            raise UserError("--amp fp16 needs a GPU; use --amp bf16 or off on CPU")
        return torch.float16
    return torch.bfloat16 if mode == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to dtype on device; a no-op context for full precision (dtype None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (CUDA, MPS); a disabled scaler (a plain step) for bf16 and full precision.

    With the fused optimizers of optim.build_optimizer, the scaler's inf/NaN check and step skip
    stay on the device: no host read per step.
    """
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


PRECISION_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
AMP_MODE_OF = {"fp32": "off", "fp16": "fp16", "bf16": "bf16"}


def precision_name(dtype: torch.dtype | None) -> str:
    """fp32, fp16 or bf16: what a checkpoint records as the precision its run trains in."""
    return PRECISION_NAMES[dtype]


def saved_precision(ckpt: dict) -> str:
    """The precision a last.pt's run trained in (read back from older files by their scaler and flags)."""
    if ckpt.get("precision") in AMP_MODE_OF:
        return ckpt["precision"]
    if ckpt.get("scaler"):  # only an enabled (fp16) scaler has state
        return "fp16"
    return {"bf16": "bf16", "fp16": "fp16"}.get(ckpt.get("config", {}).get("amp"), "fp32")


def resumed_amp(saved: str, typed: str | None, device: torch.device) -> tuple[str, str | None]:
    """The --amp mode a resumed run continues with, and a one-line note when its precision changes.

    A resume keeps the precision the run started in (`--amp auto` is not worked out again on the
    new machine), unless --amp is typed or the device cannot run it (fp16 on a CPU).
    """
    mode = typed or AMP_MODE_OF[saved]
    reason = "as --amp asks" if typed else ""
    if typed is None and saved == "fp16" and device.type == "cpu":
        mode, reason = "off", "fp16 needs a GPU"
    now = precision_name(amp_dtype(mode, device))
    if now == saved:
        return mode, None
    return mode, f"note: this run trained in {saved}; it continues in {now} on {device.type}" + (
        f" ({reason})" if reason else ""
    )
