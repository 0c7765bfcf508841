"""Benchmark: one zoo training step in float32 against bf16 mixed precision, as `layercrit zoo train` runs it.

    .venv/bin/python benchmarks/training.py [--threads 2] [--steps 8]

The step is the zoo's: the ResNet-20 (`layercrit:fmnist_resnet20`) in its normalising wrapper, batch 128 of
28×28 images, cross-entropy, SGD. Variants: ``fp32`` (contiguous NCHW weights), ``fp32 nhwc`` (channels_last, as
`fit` now trains), ``bf16 nhwc`` (also `torch.autocast` to bfloat16, `precision="bf16"`) and ``bf16 nhwc
pgd-3`` (a PGD-3 adversarial step, as the adversarial recipes). Prints milliseconds per step (fastest of
``--repeat`` rounds of ``--steps`` steps, after two warm-up steps), the implied seconds per epoch of 60,000
images, and each variant's speed-up over ``fp32``.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from layercrit.models.builders import build_architecture
from layercrit.training import _Pgd
from layercrit.zoo.fmnist import ARCH, _wrapped

VARIANTS = {"fp32": (False, False, 0), "fp32 nhwc": (False, True, 0), "bf16 nhwc": (True, True, 0),
            "bf16 nhwc pgd-3": (True, True, 3)}


def step_time(bf16: bool, channels_last: bool, pgd_steps: int, steps: int, repeat: int) -> float:
    torch.manual_seed(0)
    module, _ = build_architecture(ARCH, pretrained=False)
    net = _wrapped(module, ARCH).train()
    if channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    attack = _Pgd(norm="linf", eps=8 / 255, steps=pgd_steps) if pgd_steps else None
    x, y, g = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,)), torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(repeat):
        for i in range(steps + 2):
            if i == 2:
                start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                inputs = attack(net, x, y, g) if attack else x
                loss = F.cross_entropy(net(inputs), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"native bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    base = None
    for name, (bf16, channels_last, pgd_steps) in VARIANTS.items():
        seconds = step_time(bf16, channels_last, pgd_steps, args.steps, args.repeat)
        base = base or seconds
        print(f"{name:<16} {1000 * seconds:7.1f} ms/step  {seconds * 60000 / 128:6.0f} s/epoch  "
              f"x{base / seconds:.2f} vs fp32")


if __name__ == "__main__":
    main()
