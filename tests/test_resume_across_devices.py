"""Resuming on another machine: the run's own precision, the trained GPU's RNG state only, and a CPU
run that never touches CUDA (a CPU run on a GPU machine, a 2-GPU run resumed on one GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import train_parta
from conftest import make_dataset, train_args
from inat_classifier.checkpoint import load_checkpoint, rng_state, set_rng_state
from inat_classifier.engine import resume_training
from inat_classifier.training import Trainer, resumed_amp, saved_precision

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """One CPU epoch in bf16: its last.pt, and the folder and data to resume it."""
    tmp = tmp_path_factory.mktemp("bf16")
    data = make_dataset(tmp / "ds", ["blue", "red"], n_train=6, n_val=3, size=32)
    out = tmp / "runs"
    train_parta.main(train_parta.get_args_parser().parse_args(train_args(data, out, "r", 1, "--amp", "bf16")))
    return data, out


def test_last_pt_records_the_precision_the_run_trained_in(bf16_run):
    ckpt = load_checkpoint(bf16_run[1] / "r" / "last.pt")
    assert ckpt["precision"] == "bf16" and saved_precision(ckpt) == "bf16"
    assert "cuda" not in ckpt["rng"]  # a CPU run saves no GPU state


def test_resume_that_changes_precision_says_so_in_one_line(bf16_run, capsys):
    data, out = bf16_run
    capsys.readouterr()
    train_parta.main(
        train_parta.get_args_parser().parse_args(
            train_args(data, out, "r", 2, "--amp", "off") + ["--resume", str(out / "r")]
        )
    )
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "continues in" in ln]
    assert notes == ["note: this run trained in bf16; it continues in fp32 on cpu (as --amp asks)"]
    assert load_checkpoint(out / "r" / "last.pt")["precision"] == "fp32"


def test_a_resume_keeps_the_saved_precision_instead_of_working_out_auto_again():
    cuda = torch.device("cuda")  # amp_dtype only names the dtype: nothing runs on the GPU
    assert resumed_amp("fp32", None, cuda) == ("off", None)  # a CPU-started run keeps fp32 on a GPU
    assert resumed_amp("bf16", None, CPU) == ("bf16", None)
    mode, note = resumed_amp("fp16", None, CPU)  # a GPU fp16 run resumed on a laptop
    assert mode == "off" and note == "note: this run trained in fp16; it continues in fp32 on cpu (fp16 needs a GPU)"
    assert resumed_amp("fp32", "fp16", cuda) == (
        "fp16",
        "note: this run trained in fp32; it continues in fp16 on cuda (as --amp asks)",
    )


def test_an_fp32_last_pt_resumes_into_an_enabled_fp16_scaler(bf16_run):
    """The state of a disabled scaler is {}: an fp16 resume starts a fresh scale instead of raising."""
    ckpt = load_checkpoint(bf16_run[1] / "r" / "last.pt")
    assert ckpt["scaler"] == {}
    model = train_parta.build_model(
        train_parta.get_args_parser().parse_args(train_args(bf16_run[0], bf16_run[1], "x", 1)), 2
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = {**ckpt, "optimizer": opt.state_dict()}  # the scaler is what this test is about
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # what a CUDA fp16 resume builds
    t = Trainer(model, opt, nn.CrossEntropyLoss(), CPU, torch.float16, scaler, scheduler=sched)
    resume_training(ckpt, t, model, bf16_run[1] / "r")
    assert scaler.get_scale() == 2.0**16


class CudaCalls:
    """Stands in for torch.cuda's RNG functions on a machine without a GPU, recording each call."""

    def __init__(self, monkeypatch, visible: int) -> None:
        self.calls: list = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.refuse("get_rng_state_all"))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.refuse("set_rng_state_all"))
        monkeypatch.setattr(
            torch.cuda,
            "get_rng_state",
            lambda device="cuda": self.calls.append(("get", str(device))) or torch.tensor([7]),
        )
        monkeypatch.setattr(
            torch.cuda,
            "set_rng_state",
            lambda state, device="cuda": self.calls.append(("set", str(device), state.tolist())),
        )

    def refuse(self, name):
        def call(*a, **k):
            raise AssertionError(f"torch.cuda.{name} touches every visible GPU")

        return call


def test_rng_state_covers_the_trained_device_only(monkeypatch):
    cuda = CudaCalls(monkeypatch, visible=1)
    assert "cuda" not in rng_state(CPU) and cuda.calls == []  # a CPU run on a GPU machine: no CUDA call
    state = rng_state(torch.device("cuda", 0))
    assert cuda.calls == [("get", "cuda:0")] and state["cuda"].tolist() == [7]
    set_rng_state(state, CPU)  # resumed on a CPU: the GPU state is not restored anywhere
    assert cuda.calls == [("get", "cuda:0")]
    set_rng_state(state, torch.device("cuda", 0))
    assert cuda.calls[-1] == ("set", "cuda:0", [7])


def test_an_older_two_gpu_rng_state_resumes_on_one_gpu(monkeypatch):
    cuda = CudaCalls(monkeypatch, visible=1)
    state = {
        "torch": torch.get_rng_state(),
        "python": [0] * 624 + [624],
        "cuda": [torch.tensor([1]), torch.tensor([2])],
    }
    set_rng_state(state, torch.device("cuda", 0))
    assert cuda.calls == [("set", "cuda:0", [1])]
