"""Step time of resnet50 on this machine with and without --ema (fused vs per-tensor EMA update).

python tools/ema_bench.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import time

import torch
import torchvision
from torch import nn
from torch.optim.swa_utils import AveragedModel

from inat_classifier.devices import select_device
from inat_classifier.optim import build_ema
from inat_classifier.training import Trainer, grad_scaler, train_step

dev = select_device("cpu")
torch.manual_seed(0)
model = torchvision.models.resnet50(num_classes=10).to(memory_format=torch.channels_last)


def old_ema(decay):
    def ema(a, c, n):
        d = torch.clamp((1 + n) / (10 + n), max=decay).to(a.dtype)
        return a * d + c * (1 - d)

    return AveragedModel(model, avg_fn=ema, use_buffers=True)


x = torch.randn(16, 3, 128, 128).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (16,))


def timed(ema, steps=6):
    t = Trainer(
        model,
        torch.optim.AdamW(model.parameters(), 1e-3),
        nn.CrossEntropyLoss(),
        dev,
        None,
        grad_scaler(dev, None),
        ema=ema,
    )
    train_step(t, x, y)
    train_step(t, x, y)  # warm-up (first EMA call copies)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(t, x, y)
    return (time.perf_counter() - t0) / steps


def update_only(ema, reps=10):
    ema.update_parameters(model)
    ema.update_parameters(model)
    t0 = time.perf_counter()
    for _ in range(reps):
        ema.update_parameters(model)
    return (time.perf_counter() - t0) / reps


print(
    f"update_parameters: per-tensor avg_fn {1000 * update_only(old_ema(0.999)):.1f} ms, "
    f"foreach multi_avg_fn {1000 * update_only(build_ema(model, 0.999)):.1f} ms"
)
print(
    f"train step (batch 16, 128 px): no EMA {timed(None):.3f} s, per-tensor EMA {timed(old_ema(0.999)):.3f} s, "
    f"foreach EMA {timed(build_ema(model, 0.999)):.3f} s"
)
