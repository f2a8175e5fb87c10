"""Where a run computes: device choice, the CPU allocator tuning, and the torchrun process group."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inat_classifier.cli import UserError
from inat_classifier.images import batch_to_device


def select_device(name: str = "auto") -> torch.device:
    """--device as a torch.device (a one-line error when it is not there)."""
    device = _resolve_device(name)
    if device.type == "cpu":
        keep_freed_memory()  # about 2x faster CPU steps and batches: no page faults per batch
    return device


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():  # under torchrun, each process takes its own GPU
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible")
    if device.type == "cuda" and device.index is None:  # under torchrun, each process takes its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available on this machine")
    return device


def host_memory_available() -> int | None:
    """Bytes the host can still give this process: MemAvailable, capped by a cgroup v2 limit (containers)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None  # not Linux: no check
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def memory_available(device: torch.device) -> int | None:
    """Bytes free for a run on device: a CUDA GPU's free memory, the host's on a CPU; None when unknown (MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return host_memory_available()
    return None


def tune_kernels(device: torch.device) -> None:
    """Kernel choices, as training and bench.py both run: on CUDA, cuDNN benchmarks (the input sizes are
    fixed) and TF32 tensor cores for float32 convolutions and matmuls (Ampere and later; a 10-bit
    mantissa, as PyTorch's own default for convolutions)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch 2.9+: the new switches (mixing in the old ones raises)
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


_ALLOCATOR_TUNED = False


def keep_freed_memory() -> None:
    """Let glibc reuse freed batch buffers instead of handing them back to the OS.

    A 224 px float batch is tens of MB, above glibc's mmap threshold: every batch would be a fresh
    mapping whose pages fault in one by one, which costs more than the normalisation itself on a
    CPU (measured 3x). PyTorch's CPU tuning guide suggests jemalloc/tcmalloc for the same reason;
    mallopt needs no preload. A no-op off glibc; process-wide: select_device calls it once a
    run's device is the CPU.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):  # musl or another libc: keep its defaults
        pass


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def process_group_backend(device: torch.device) -> str:
    """The torchrun backend for the device this process trains on: NCCL for CUDA, gloo otherwise, and
    gloo where a node runs more processes than it has GPUs (NCCL refuses two ranks on one GPU)."""
    if device.type != "cuda":
        return "gloo"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "gloo" if local > 1 and local > torch.cuda.device_count() else "nccl"


def launched_rank() -> int:
    """This process's torchrun rank from its environment (0 without torchrun), before it joins the group."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group when launched by torchrun, with the backend `device` needs.

    Chosen from the device, not from what the machine has: `--device cpu` on a GPU machine gets gloo.
    """
    import torch.distributed as td

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not td.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        td.init_process_group(process_group_backend(device))
    return Dist(rank, world, local_rank)


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype for running sums on `device`: float64, or float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over all processes (identity without torchrun)."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return values
    t = torch.tensor(values, dtype=sum_dtype(device), device=device)
    td.all_reduce(t)
    return t.tolist()


def broadcast(obj: Any, dist: Dist) -> Any:
    """Rank 0's value of obj on every process."""
    if dist.world == 1:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def finish_distributed() -> None:
    """Wait for every process, then leave the process group (a no-op without torchrun)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def wrap_ddp(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the currently trainable parameters (identity without torchrun)."""
    if dist.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def distributed() -> bool:
    """Whether this process is one of several in a torchrun process group."""
    import torch.distributed as td

    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


# ----------------------------------------------------------------------------- what only torchrun needs of the loop
def agreed_stop(stopping: bool, shared_point: bool, device: torch.device) -> bool:
    """Whether to stop after this step. Alone, as this process wishes; under torchrun all processes decide
    together, at shared points only (steps every process reaches at once), so none waits for the rest."""
    if not distributed():
        return stopping
    return shared_point and all_reduce_sum([float(stopping)], device)[0] > 0


def matched_batches(loader: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of each loader batch on the device, without the batches whose images were all unreadable.

    Under torchrun every process must take the same steps (the all-reduces pair them up), so
    there such a batch is replaced by the previous readable one (the next one, early in an epoch).
    """
    fill = distributed()
    last, owed = None, 0
    for batch in loader:
        moved = batch_to_device(batch, device)
        if moved is None:
            if fill and last is not None:
                yield last
            owed += fill and last is None
            continue
        for _ in range(owed + 1):
            yield moved
        last, owed = moved, 0
    if owed:  # the other processes would wait for these steps forever
        raise UserError("every image this process was given in the epoch is unreadable")
