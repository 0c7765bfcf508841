"""Benchmark: the same sweep with the naive engine and the fast engine's variants, side by side, one fresh process each.

    .venv/bin/python benchmarks/sweep.py                 # resnet18 + resnet50 at 224 px, the trained zoo model
    .venv/bin/python benchmarks/sweep.py --cases resnet18 --images 32 --repeat 2

Configs: ``paper`` is the paper's method (a full forward per (layer, trial) over batches decoded again from the
JPEG files) in a plain Python process, the baseline; ``naive`` is the same with layercrit's allocator setting
(glibc keeps freed memory, see ``layercrit.measurement.engine.keep_freed_memory``); ``exact`` is prefix replay alone
(bit-identical to naive; decoding once, cold disk cache included in its time); ``nhwc`` adds NHWC layout; ``fast``
(the default) also folds BatchNorm into the convolution before it. Each run is a fresh process, so none inherits
another's allocator state or warm-up; with ``--repeat`` the runs are interleaved and the fastest counts.

Prints seconds, images/s (image-forwards per second over the whole sweep), the ratio to the baseline (also in CPU
seconds, ``x_paper_cpu``, which a busy shared host disturbs less) and to ``naive``, the FLOP bound of prefix replay
(naive's conv/linear FLOPs over replay's), the peak RSS of the run's process, and the largest difference of any
metric from the baseline, relative to the metric's size where that is above 1 (``max_rel_diff``), of top-1
(``d_top1``, points) and of the cosine similarity (``d_cos``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

import layercrit
from layercrit.columns import METRIC_COLUMNS
from layercrit.measurement.engine import keep_freed_memory
from layercrit.resolve import resolve_model

CASES = {
    # name: (model spec, data, images, trials, pretrained)
    "resnet18": ("timm:resnet18", "jpeg224", 64, 1, False),
    "resnet50": ("timm:resnet50", "jpeg224", 32, 1, False),
    "fmnist": ("zoo:fmnist/baseline", "fashion-mnist", 1000, 3, True),
}


def synthetic_imagenet(root: Path, n: int) -> Path:
    """JPEGs of ImageNet's typical size (500×375) in class folders, so decoding costs what it costs there."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)  # smooth-ish content compresses like a photo
        image = Image.fromarray(base).resize((500, 375), Image.BILINEAR)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


class PeakRSS:
    """Samples this process's resident memory while a block runs."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CONFIGS = {  # name: (engine, precision, channels_last, fold_bn, glibc allocator)
    "paper": ("naive", "fp32", False, False, "default"),  # the paper's method in a plain process: the baseline
    "naive": ("naive", "fp32", False, False, "kept"),  # the same, with layercrit's allocator setting
    "exact": ("fast", "fp32", False, False, "kept"),  # prefix replay alone (--exact): bit-identical to naive
    "nhwc": ("fast", "fp32", True, False, "kept"),  # + NHWC layout
    "fast": ("fast", "fp32", True, True, "kept"),  # the default: + BatchNorm folded into the conv before it
    "fast-bf16": ("fast", "bf16", True, True, "kept"),
}


def replay_flop_bound(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The most prefix replay can gain: naive's conv/linear FLOPs over replay's, one unit per conv/linear layer.

    Replay still computes every layer that starts at or after the reset layer, so however fast the kernels, this
    is the ratio of work; what remains beyond it is per-FLOP speed (layout, fused BatchNorm) and decoding.
    """
    flops: list[int] = []

    def count(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        flops.append(output.numel() * per_output)

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    total = sum(flops)
    suffixes = [sum(flops[i:]) for i in range(len(flops))]
    return len(flops) * total / sum(suffixes)


def plain_bf16_gain(name: str, batch_size: int, device: str, repeats: int = 5) -> float:
    """How much faster a plain forward of the model runs under bf16 autocast than in fp32 (NHWC, no layercrit):
    the gain the engine's bf16 should keep. Best of ``repeats`` timed forwards each, after a warm-up."""
    resolved = build_model(name)
    res = resolved.preprocessing.crop or 28
    model = resolved.model.to(device).to(memory_format=torch.channels_last)
    x = torch.rand(batch_size, resolved.preprocessing.in_chans, res, res, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    seconds = {}
    for dtype in (None, torch.bfloat16):
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            model(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        seconds[dtype] = min(times)
    return seconds[None] / seconds[torch.bfloat16]


def build_model(name: str):
    spec, _, _, _, pretrained = CASES[name]
    resolved = resolve_model(spec, pretrained=pretrained)
    if spec.startswith("timm:"):  # random init with timm's zero-init of the last BN would make resets no-ops
        import timm

        torch.manual_seed(0)
        resolved.model.model = timm.create_model(spec.removeprefix("timm:"), zero_init_last=False).eval()
    return resolved


def measure_config(name: str, config: str, data: str, n_images: int, batch_size: int, device: str,
                   cache: str) -> dict:
    """One run of one config, in a fresh process (so no run inherits another's allocator state or warm-up)."""
    engine, precision, channels_last, fold_bn, allocator = CONFIGS[config]
    if allocator == "default":
        os.environ["LAYERCRIT_MALLOC"] = "default"
    keep_freed_memory()  # the command line's setting, which measure() itself leaves alone
    resolved = build_model(name)
    with PeakRSS() as rss:
        start, cpu_start = time.perf_counter(), time.process_time()
        df = layercrit.measure(resolved, data, trials=CASES[name][3], images=n_images, batch_size=batch_size,
                               engine=engine, precision=precision, cache_dir=cache, device=device,
                               channels_last=channels_last, fold_bn=fold_bn)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"df": df, "seconds": seconds, "cpu": cpu, "peak": rss.peak}


def run_case(name: str, images: int | None, batch_size: int, workdir: Path, config_names: list[str],
             device: str = "cpu", repeat: int = 1) -> list[dict]:
    _, data, n_images, trials, _ = CASES[name]
    n_images = images or n_images
    workdir.mkdir(parents=True, exist_ok=True)
    if data == "jpeg224":
        data = str(synthetic_imagenet(workdir / "imagenet", n_images))
    resolved = build_model(name)
    n_layers = len(layercrit.select_layers(resolved.model, "conv,linear"))
    res = resolved.preprocessing.crop or 28
    bound = replay_flop_bound(resolved.model, torch.rand(1, resolved.preprocessing.in_chans, res, res))
    runs: dict[str, list[dict]] = {}
    spawn = multiprocessing.get_context("spawn")
    for _ in range(repeat):  # interleaved, so that a slow spell of a shared machine hits every config alike
        for config in config_names:
            cache = tempfile.mkdtemp(dir=workdir)  # cold: decoding is inside the fast engine's time
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                run = pool.submit(measure_config, name, config, data, n_images, batch_size, device, cache).result()
            runs.setdefault(config, []).append(run)
    best = {config: min(r["seconds"] for r in rs) for config, rs in runs.items()}
    best_cpu = {config: min(r["cpu"] for r in rs) for config, rs in runs.items()}
    baseline = config_names[0]
    reference = runs[baseline][0]["df"]
    metrics = list(METRIC_COLUMNS)
    rows = []
    for config in config_names:
        engine, precision, channels_last, fold_bn, allocator = CONFIGS[config]
        df = runs[config][0]["df"]
        diff = (df[metrics] - reference[metrics]).abs()
        relative = (diff / reference[metrics].abs().clip(lower=1)).max().max()  # loss-like columns reach 10²
        row = {
            "case": name, "config": config, "engine": engine, "precision": precision,
            "layout": "NHWC" if channels_last else "NCHW", "bn": "folded" if fold_bn else "-", "malloc": allocator,
            "res": res, "images": n_images, "layers": n_layers, "trials": trials,
            "seconds": round(best[config], 1), "images/s": round((len(df) - 1) * n_images / best[config], 1),
            "peak_rss_gb": round(max(r["peak"] for r in runs[config]) / 2**30, 2), "flop_bound": round(bound, 2),
            f"x_{baseline}": round(best[baseline] / best[config], 2),
            f"x_{baseline}_cpu": round(best_cpu[baseline] / best_cpu[config], 2),
        }
        if "naive" in best and baseline != "naive":
            row["x_naive"] = round(best["naive"] / best[config], 2)
        row.update({"max_rel_diff": f"{relative:.2g}", "d_top1": round(diff["top1_acc"].max(), 3),
                    "d_cos": f"{diff['pred_cos_sim'].max():.2g}"})
        rows.append(row)
    if "fast" in best and "fast-bf16" in best:  # does the engine keep a plain forward's bf16 gain?
        rows[-1]["bf16_gain_engine"] = round(best["fast"] / best["fast-bf16"], 2)
        rows[-1]["bf16_gain_plain"] = round(plain_bf16_gain(name, batch_size, device), 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="resnet18,resnet50,fmnist")
    parser.add_argument("--images", type=int, help="images per case (default: per case)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each config, interleaved; the fastest counts")
    parser.add_argument("--configs", help=f"comma list of {', '.join(CONFIGS)}; the first is the baseline (default: all, "
                        "without fast-bf16 on CPUs that emulate bf16: several times slower than fp32 there)")
    args = parser.parse_args()
    if args.configs is None:
        emulated_bf16 = args.device == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        args.configs = "paper,naive,exact,nhwc,fast" + ("" if emulated_bf16 else ",fast-bf16")
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            rows += run_case(name, args.images, args.batch_size, Path(tmp) / name, args.configs.split(","),
                             args.device, args.repeat)
            print(pd.DataFrame(rows).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
