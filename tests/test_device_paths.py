"""The device-specific choices, checked on a CPU: sums without float64 on MPS, the torchrun backend
from the device, --compile over the DDP module, and augmentation that crops before it converts."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from inat_classifier.device_batches import augment_params, crop_resize_flip
from inat_classifier.devices import Dist, process_group_backend, select_device, sum_dtype
from inat_classifier.engine import stepping_module


def test_running_sums_are_float32_on_mps_and_float64_elsewhere():
    assert sum_dtype(torch.device("mps")) == torch.float32  # MPS has no float64
    assert sum_dtype(torch.device("cpu")) == torch.float64
    assert sum_dtype(torch.device("cuda", 0)) == torch.float64


def test_backend_follows_the_device_not_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    assert process_group_backend(torch.device("cpu")) == "gloo"
    assert process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert process_group_backend(torch.device("mps")) == "gloo"


def test_cuda_without_an_index_is_this_process_gpu_under_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert select_device("cuda") == torch.device("cuda", 1)
    assert select_device("cuda:0") == torch.device("cuda", 0)


@pytest.fixture
def one_process_group(tmp_path):
    """A real gloo process group of one process, so DDP can wrap a module in this test."""
    td.init_process_group("gloo", store=td.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    td.destroy_process_group()


def test_compile_wraps_the_ddp_module_not_the_other_way_round(one_process_group):
    model = nn.Linear(4, 2)
    # wrap_ddp wraps whenever the job has several processes; the one real process stands in for them
    stepping = stepping_module(model, argparse.Namespace(compile=True), Dist(0, 2, 0), torch.device("cpu"))
    assert isinstance(stepping, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(stepping._orig_mod, DistributedDataParallel)
    assert stepping._orig_mod.module is model
    plain = stepping_module(model, argparse.Namespace(compile=False), Dist(0, 2, 0), torch.device("cpu"))
    assert isinstance(plain, DistributedDataParallel) and plain.module is model


class FloatCopies(TorchDispatchMode):
    """Records the element count of every conversion to float."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.float32:
            self.sizes.append(args[0].numel())
        return func(*args, **kwargs)


def test_augmentation_converts_each_crop_not_the_stored_batch():
    # The meta device stands in for a GPU: shapes and dtypes without memory, and not the CPU's uint8 kernel.
    n, side, out = 256, 518, 224
    stored = torch.empty((n, 3, side, side), dtype=torch.uint8, device="meta")
    params = augment_params(n, torch.Generator().manual_seed(0), scale=(0.25, 0.25))
    with FloatCopies() as copies:
        result = crop_resize_flip(stored, out, params)
    assert result.dtype == torch.float32 and result.shape == (n, 3, out, out)
    assert len(copies.sizes) == n  # one conversion per crop
    # a quarter of the area each: the whole stored batch (206 M values, 0.8 GB as float) is never float
    assert max(copies.sizes) < 3 * side * side * 0.3
