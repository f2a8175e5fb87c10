"""The mixed-precision step (training.train_step): loss scaling, unscale before clipping, bf16, scaler resume.

CPU runs fp16 and bf16 autocast and an enabled GradScaler, so the step's logic is pinned here on
every machine (`training.grad_scaler` enables the scaler for fp16 on any device). Tests with "cuda" in their
name run amp's own CUDA fp16 path and skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import train_parta
from conftest import CLASSES, make_dataset, train_args
from inat_classifier.checkpoint import TrainState, load_checkpoint
from inat_classifier.cli import UserError
from inat_classifier.devices import Dist
from inat_classifier.engine import Checkpointer, resume_training
from inat_classifier.training import Trainer, amp_dtype, autocast, build_trainer, grad_scaler, train_step

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_net(device: torch.device = CPU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)


def batch(device: torch.device = CPU, seed: int = 1, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(8, 6, generator=g) * scale).to(device), (torch.arange(8) % 3).to(device)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def grad_norm_at_step(optimizer: torch.optim.Optimizer) -> list[float]:
    """Records the total gradient norm the optimizer sees each time it really steps."""
    seen: list[float] = []

    def hook(opt, args, kwargs):
        grads = [p.grad.detach().float() for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    optimizer.register_step_pre_hook(hook)
    return seen


def sgd_training(model, dtype, scaler, device=CPU, lr=0.1, grad_clip=0.0) -> Trainer:
    return Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        nn.CrossEntropyLoss(),
        device,
        dtype,
        scaler,
        grad_clip=grad_clip,
    )


# ----------------------------------------------------------------------------- dtype and scaler choice
def test_amp_modes_choose_the_documented_dtype_and_scaler(monkeypatch):
    """auto = full precision on CPU, bf16 on GPUs that have it, else fp16; fp16 refused on CPU, bf16
    honoured; the scaler is on for fp16 only."""
    assert amp_dtype("auto", CPU) is None and amp_dtype("off", CPU) is None
    assert amp_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(UserError, match="fp16"):
        amp_dtype("fp16", CPU)
    assert grad_scaler(CPU, torch.float16).is_enabled()  # fp16 always scales (CPU fp16 only in tests)
    assert not grad_scaler(CPU, torch.bfloat16).is_enabled() and not grad_scaler(CPU, None).is_enabled()
    for capability, auto in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert amp_dtype("auto", torch.device("cuda")) is auto, capability  # Turing: fp16; Ampere on: bf16
    assert amp_dtype("bf16", torch.device("cuda")) is torch.bfloat16


# ----------------------------------------------------------------------------- inf gradients
def check_inf_step_is_skipped(device, dtype, scaler, x, y, grad_clip):
    model = tiny_net(device)
    t = sgd_training(model, dtype, scaler, device, grad_clip=grad_clip)
    before, scale = weights(model), scaler.get_scale()
    train_step(t, x, y)
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters())  # the step really saw inf
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))  # ... and was skipped
    assert scaler.get_scale() == scale * 0.5  # backoff
    return model, t


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    """fp16 gradients overflow under a huge scale: no weight changes, the scale backs off."""
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**40)
    check_inf_step_is_skipped(CPU, torch.float16, scaler, *batch(), grad_clip=0.0)


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_inf_input_skips_the_step_with_and_without_clipping_then_training_goes_on(grad_clip):
    """An inf in the batch skips the step (also through unscale_ + clip); the next finite batch steps."""
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    x, y = batch()
    x[0, 0] = float("inf")
    model, t = check_inf_step_is_skipped(CPU, None, scaler, x, y, grad_clip)
    before = weights(model)
    train_step(t, *batch(seed=2))
    after = weights(model)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert scaler.get_scale() == 2.0**9  # no growth after a single good step


# ----------------------------------------------------------------------------- clipping sees unscaled gradients
def check_clip_sees_unscaled_gradients(device, dtype, scaler, atol, x_scale=50.0, bound=1.0):
    """The clipped step under a large loss scale equals the full-precision clipped step."""
    x, y = batch(device, scale=x_scale)  # large inputs: a true gradient norm above the bound
    ref_model, model = tiny_net(device), tiny_net(device)
    ref = sgd_training(
        ref_model, None, torch.amp.GradScaler(device.type, enabled=False), device, lr=1.0, grad_clip=bound
    )
    t = sgd_training(model, dtype, scaler, device, lr=1.0, grad_clip=bound)
    ref_norms, norms = grad_norm_at_step(ref.optimizer), grad_norm_at_step(t.optimizer)
    start = weights(model)
    train_step(ref, x, y)
    if dtype == torch.float16:  # the scaled gradients keep a 4x margin below fp16's largest value
        peak = max(p.grad.abs().max().item() for p in ref_model.parameters()) * scaler.get_scale()
        assert peak < torch.finfo(torch.float16).max / 4, peak
    train_step(t, x, y)
    assert ref_norms == pytest.approx([bound], rel=1e-5)
    assert norms == pytest.approx([bound], rel=atol)  # the bound itself, not bound / scale
    step = torch.linalg.vector_norm(torch.cat([(a - b).flatten() for a, b in zip(start, weights(model), strict=True)]))
    assert step.item() == pytest.approx(bound, rel=atol)  # SGD, lr 1: the update is the clipped gradient
    for a, b in zip(weights(ref_model), weights(model), strict=True):
        assert torch.allclose(a, b, atol=atol), (a, b)


def test_clipping_sees_unscaled_gradients_under_a_large_loss_scale():
    """unscale_ before clip_grad_norm_: the gradient norm at step time is grad_clip, not grad_clip / scale."""
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**16)
    check_clip_sees_unscaled_gradients(CPU, None, scaler, atol=1e-5)
    assert scaler.get_scale() == 2.0**16  # a finite step: no backoff


def test_fp16_clipping_sees_unscaled_gradients():
    """The same under fp16 autocast at CUDA's default scale 65536 (true gradient norm about 0.45, bound 0.2)."""
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    check_clip_sees_unscaled_gradients(CPU, torch.float16, scaler, atol=5e-3, x_scale=1.0, bound=0.2)
    assert scaler.get_scale() == 2.0**16


def test_grad_clip_flag_bounds_the_gradient_norm_at_step_time():
    """--grad_clip 1 reaches the step through the engine's builders: a huge gradient is cut to norm 1."""
    norms = {}
    for clip in ("0", "1"):
        args = train_parta.get_args_parser().parse_args(
            ["--grad_clip", clip, "--amp", "off", "--lr", "1e-3", "--warmup_epochs", "0"]
        )
        model = tiny_net()
        groups = [{"params": list(model.parameters()), "lr": args.lr, "weight_decay": 0.0}]
        t = build_trainer(args, model, groups, CPU, steps_per_epoch=4, num_classes=3, dist=Dist())
        seen = grad_norm_at_step(t.optimizer)
        train_step(t, *batch(scale=1e4))
        norms[clip] = seen[0]
    assert norms["0"] > 100  # the gradient is huge without clipping ...
    assert norms["1"] == pytest.approx(1.0, rel=1e-5)  # ... and exactly at the bound with --grad_clip 1


# ----------------------------------------------------------------------------- low-precision steps
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_step_runs_in_low_precision_and_moves_fp32_weights(dtype):
    """The forward runs in the autocast dtype; the fp32 weights move by about the full-precision step."""
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16, init_scale=2.0**8)
    model, ref_model = tiny_net(), tiny_net()
    t = sgd_training(model, dtype, scaler)
    ref = sgd_training(ref_model, None, torch.amp.GradScaler("cpu", enabled=False))
    start = weights(model)
    loss, out = train_step(t, *batch())
    ref_loss, ref_out = train_step(ref, *batch())
    assert out.dtype == dtype and ref_out.dtype == torch.float32
    assert not torch.equal(out.float(), ref_out)  # really computed in low precision
    assert loss.item() == pytest.approx(ref_loss.item(), abs=0.05)
    moved = [b - a for a, b in zip(start, weights(model), strict=True)]
    ref_moved = [b - a for a, b in zip(start, weights(ref_model), strict=True)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for m, r in zip(moved, ref_moved, strict=True):
        assert m.abs().sum() > 0
        assert torch.allclose(m, r, atol=0.02 * r.abs().max().item() + 1e-4)


def test_autocast_context_is_a_no_op_for_full_precision():
    """dtype None: the forward stays in float32 even inside autocast()."""
    with autocast(CPU, None):
        assert tiny_net()(batch()[0]).dtype == torch.float32
    with autocast(CPU, torch.bfloat16):
        assert tiny_net()(batch()[0]).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- scaler state through resume
META = {"spec": {}, "class_names": list(CLASSES[:3]), "preprocess": {}, "config": {}}


def scaled_training(device, scaler) -> Trainer:
    model = tiny_net(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return Trainer(model, opt, nn.CrossEntropyLoss(), device, torch.float16, scaler, scheduler=sched, grad_clip=5.0)


def check_scaler_resume(device, tmp_path, make_scaler):
    live = scaled_training(device, make_scaler())
    for s in range(6):
        train_step(live, *batch(device, seed=10 + s))
    state = live.scaler.state_dict()
    assert state["scale"] != 2.0**17 or state["_growth_tracker"] != 0  # the run changed the scaler
    saver = Checkpointer(tmp_path, META, live.model, live.model, live, [], enabled=True)
    saver.save_last(TrainState(epoch=1))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)  # META is no model: not load_checkpoint's checks
    assert ckpt["scaler"] == state  # last.pt holds the live scaler state

    fresh = scaled_training(device, torch.amp.GradScaler(device.type, enabled=True))  # default state
    torch.manual_seed(123)
    for p in fresh.model.parameters():
        p.data.normal_()
    resume_training(ckpt, fresh, fresh.model, tmp_path)
    assert fresh.scaler.state_dict() == state
    for s in range(4):  # both continue identically: same weights, same scaler
        train_step(live, *batch(device, seed=20 + s))
        train_step(fresh, *batch(device, seed=20 + s))
    assert fresh.scaler.state_dict() == live.scaler.state_dict()
    for a, b in zip(weights(live.model), weights(fresh.model), strict=True):
        assert torch.equal(a, b)


def test_grad_scaler_state_round_trips_through_last_pt_and_resume(tmp_path):
    """Checkpointer saves the live scale and growth tracker; resume_training restores them exactly."""
    check_scaler_resume(
        CPU, tmp_path, lambda: torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**17, growth_interval=2)
    )


# ----------------------------------------------------------------------------- CUDA: amp's own fp16 path
CUDA = torch.device("cuda")


@needs_cuda
def test_cuda_fp16_scaler_is_enabled_and_skips_an_inf_step():
    """On CUDA, --amp fp16 gives an enabled scaler, and it skips a step with inf gradients."""
    dtype = amp_dtype("fp16", CUDA)
    scaler = grad_scaler(CUDA, dtype)
    assert dtype is torch.float16 and scaler.is_enabled()
    x, y = batch(CUDA)
    x[0, 0] = float("inf")
    check_inf_step_is_skipped(CUDA, dtype, scaler, x, y, grad_clip=1.0)


@needs_cuda
def test_cuda_fp16_clipping_sees_unscaled_gradients():
    """amp's CUDA fp16 scaler (scale 65536): clipped norm at step time is the bound, as in fp32."""
    scaler = grad_scaler(CUDA, torch.float16)
    check_clip_sees_unscaled_gradients(CUDA, torch.float16, scaler, atol=5e-3, x_scale=1.0, bound=0.2)
    assert scaler.get_scale() == 2.0**16


@needs_cuda
def test_cuda_fp16_step_moves_weights_in_fp16():
    """The CUDA fp16 forward runs in half precision and the fp32 weights move."""
    model = tiny_net(CUDA)
    t = sgd_training(model, torch.float16, grad_scaler(CUDA, torch.float16), CUDA)
    start = weights(model)
    loss, out = train_step(t, *batch(CUDA))
    assert out.dtype == torch.float16 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(start, weights(model), strict=True))


@needs_cuda
def test_cuda_grad_scaler_state_round_trips_through_resume(tmp_path):
    check_scaler_resume(
        CUDA, tmp_path, lambda: torch.amp.GradScaler("cuda", enabled=True, init_scale=2.0**17, growth_interval=2)
    )


@needs_cuda
def test_cuda_train_parta_fp16_run_saves_an_enabled_scaler(tmp_path):
    """A real --amp fp16 run on CUDA writes the GradScaler's state (scale, tracker) into last.pt."""
    data = make_dataset(tmp_path / "ds", CLASSES[:2], n_train=4, n_val=2, size=32)
    args = train_parta.get_args_parser().parse_args(
        [*train_args(data, tmp_path / "runs", "fp16", 1, "--amp", "fp16"), "--device", "cuda"]
    )
    train_parta.main(args)
    scaler = load_checkpoint(tmp_path / "runs" / "fp16" / "last.pt")["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler


# ----------------------------------------------------------------------------- gradient accumulation
def test_two_accumulated_batches_of_16_update_like_one_batch_of_32():
    """--accum_steps: micro-batches add their gradients (loss / K), one optimizer and schedule step per K."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8), torch.arange(32) % 4

    def trained(micro: int) -> tuple[dict, list[float]]:
        torch.manual_seed(1)  # the same initial weights; no dropout or batch norm: no batch noise
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # the gradient's size matters
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        cpu = torch.device("cpu")
        t = Trainer(
            model,
            opt,
            nn.CrossEntropyLoss(),
            cpu,
            None,
            grad_scaler(cpu, None),
            scheduler=sched,
            accum_steps=32 // micro,
        )
        lrs = []
        for _ in range(3):  # three optimizer steps
            chunks = list(zip(x.split(micro), y.split(micro), strict=True))
            for i, (xb, yb) in enumerate(chunks):
                train_step(t, xb, yb, len(chunks), update=i == len(chunks) - 1)
            lrs.append(opt.param_groups[0]["lr"])
        return {k: v.clone() for k, v in model.state_dict().items()}, lrs

    one, lrs_one = trained(32)
    two, lrs_two = trained(16)
    assert lrs_one == lrs_two == pytest.approx([0.05, 0.1 / 3, 0.025])  # one schedule step per update
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6), k


def test_accumulating_run_counts_optimizer_steps(tmp_path):
    """train_parta.py --accum_steps 2: the schedule (and so the warm-up and cosine) counts optimizer steps."""
    import train_parta
    from conftest import CLASSES, make_dataset, train_args
    from inat_classifier.checkpoint import load_checkpoint

    data = make_dataset(tmp_path / "ds", CLASSES[:2], n_train=20, n_val=4, size=32)
    args = train_parta.get_args_parser().parse_args(
        train_args(data, tmp_path / "runs", "acc", 2, "--batch_size", "4", "--accum_steps", "2", "--no-augment")
    )
    train_parta.main(args)
    last = load_checkpoint(tmp_path / "runs" / "acc" / "last.pt")
    # 32 training photos (40 minus the 20 % validation split) in 8 batches of 4 = 4 updates per epoch
    assert last["epoch"] == 2 and last["scheduler"]["last_epoch"] == 8
    assert last["config"]["accum_steps"] == 2
    # the cosine schedule spans the run's 8 updates: each epoch's lr is that of its last update (step 3, step 7)
    from inat_classifier.optim import lr_factor

    expected = [0.005 * lr_factor(step, 8, 0, "cosine") for step in (3, 7)]
    assert [r["lr"] for r in last["metrics"]] == pytest.approx(expected, rel=1e-9)
