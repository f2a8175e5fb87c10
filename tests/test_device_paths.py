"""The device-specific choices, checked on a CPU: sums without float64 on MPS, the torchrun backend
from the device, --compile over the DDP module, and augmentation in a constant number of operations."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from inat_classifier.device_batches import augment_params, model_inputs
from inat_classifier.devices import Dist, process_group_backend, select_device, sum_dtype
from inat_classifier.presets import Preprocess
from inat_classifier.training import stepping_module


def test_running_sums_are_float32_on_mps_and_float64_elsewhere():
    assert sum_dtype(torch.device("mps")) == torch.float32  # MPS has no float64
    assert sum_dtype(torch.device("cpu")) == torch.float64
    assert sum_dtype(torch.device("cuda", 0)) == torch.float64


def test_backend_follows_the_device_not_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    assert process_group_backend(torch.device("cpu")) == "gloo"
    assert process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert process_group_backend(torch.device("mps")) == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks share the one GPU: NCCL would refuse
    assert process_group_backend(torch.device("cuda", 0)) == "gloo"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert process_group_backend(torch.device("cuda", 0)) == "nccl"


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


class OpCount(TorchDispatchMode):
    """Counts the aten operations dispatched (on a GPU, each is a kernel launch or a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_augmentation_takes_as_many_operations_for_any_batch():
    """The device path: crop, resize, flip, colour and normalisation of 8 or 256 images in the same few
    operations. The meta device stands in for a GPU: shapes and dtypes without memory."""
    side, pre = 518, Preprocess.for_size(224)
    counts = []
    for n in (8, 8, 256):  # the first call also makes the per-device constants, once
        stored = torch.empty((n, 3, side, side), dtype=torch.uint8, device="meta")
        params = augment_params(n, side, torch.Generator().manual_seed(0), scale=(0.25, 1.0)).to("meta")
        with OpCount() as ops:
            result = model_inputs(stored, pre, params)
        assert result.dtype == torch.float32 and result.shape == (n, 3, 224, 224)
        counts.append(ops.count)
    assert counts[1] == counts[2] < 100, counts  # most of them views (unsqueeze, slice, expand)
