"""models.count_complexity against torchvision's published GFLOPs (`_ops`, which are MACs) and `num_params`,
for every classification model in torchvision's weights registry, each built as its weights build it.

    python tools/check_complexity.py [--only resnet18,vit_b_16] [--tolerance 0.01]

Prints one line per model and exits 1 if any is off by more than the tolerance (or, for the tiniest
models, by more than the published figure's rounding to 3 decimals).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models import count_complexity, published_complexity  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma list of model names (default: all)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative tolerance (default: %(default)s)")
    args = parser.parse_args()
    import torchvision.models as tvm
    from torchvision.models import list_models

    names = args.only.split(",") if args.only else list_models(module=tvm)
    failed = 0
    torch.set_grad_enabled(False)
    for name in names:
        model, size, params_pub, macs_pub = published_complexity(name)
        params, macs = count_complexity(model, size)
        dp, dm = params / params_pub - 1, macs / 1e9 / macs_pub - 1
        # the registry gives GFLOPs to 3 decimals: 0.0405 against a published 0.04 is a match
        ok = abs(dp) <= args.tolerance and (abs(dm) <= args.tolerance or abs(macs / 1e9 - macs_pub) <= 0.0005)
        failed += not ok
        print(
            f"{'ok  ' if ok else 'OFF '} {name:<24} {size:>4}px  params {params:>12,} vs {params_pub:>12,} "
            f"({dp:+.3%})  GMACs {macs / 1e9:>9.3f} vs {macs_pub:>9.3f} ({dm:+.3%})",
            flush=True,
        )
        del model
    print(f"{len(names) - failed} of {len(names)} within {args.tolerance:.0%}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
