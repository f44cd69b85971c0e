"""Segmentation model throughput (samples/s): UNetWrapper forward + backward on 7×64×64 crops.

Times one training step without the optimizer (forward, chapter 13's loss, backward) of the
book's `UNetWrapper(in_channels=7, n_classes=1, depth=3, wf=4, padding=True, batch_norm=True,
up_mode="upconv")` for each batch size, with the model and batch contiguous or
`torch.channels_last`, in float32 and, on CUDA, under bfloat16 autocast. CUDA is synchronised
around every timed step. Prints a table and one JSON line.

    .venv/bin/python benchmarks/bench_seg_model.py --device cpu --batch-sizes 16 64 --repeats 5
    .venv/bin/python benchmarks/bench_seg_model.py --device cuda --batch-sizes 16 64 256 --repeats 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Sequence

import torch

from p2ch.errors import ConfigError, P2chError
from p2ch.segmetrics import segmentation_loss
from p2ch.unet import UNetWrapper

CROP_CHW = (7, 64, 64)  # the book's training crop: 7 slices of 64 × 64 pixels


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: cpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per setting (after two warm-up steps)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_batch(n: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 7, 64, 64) float32 HU (lung with a +100 HU disk and texture) and its (n, 1, 64, 64) bool mask."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disk = (rows - 31.5) ** 2 + (cols - 31.5) ** 2 <= 36.0
    images = torch.where(disk, 100.0, -850.0) + 30 * torch.randn((n, *CROP_CHW), generator=g)
    masks = disk.expand(n, 1, 64, 64).contiguous()
    return images.to(device), masks.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    model: UNetWrapper, images: torch.Tensor, masks: torch.Tensor, repeats: int, autocast: torch.dtype | None
) -> list[float]:
    """Seconds of each timed forward + loss + backward step (two untimed warm-up steps first)."""
    device = images.device
    timings = []
    for k in range(repeats + 2):
        model.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = segmentation_loss(model(images), masks).mean()
        loss.backward()
        sync(device)
        if k >= 2:
            timings.append(time.perf_counter() - start)
    return timings


def settings(device: torch.device) -> list[tuple[str, torch.dtype | None]]:
    found: list[tuple[str, torch.dtype | None]] = [("fp32", None)]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        found.append(("bf16-autocast", torch.bfloat16))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"--device {args.device}: expected cpu, cuda or cuda:K")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        if args.repeats < 1 or min(args.batch_sizes) < 1 or args.threads < 0:
            raise ConfigError("--repeats and --batch-sizes must be at least 1, --threads at least 0")
    except (P2chError, RuntimeError) as exc:
        print(f"bench_seg_model: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    torch.manual_seed(args.seed)
    model = UNetWrapper().to(device).train()
    print(
        f"device {device} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"UNetWrapper {model.describe()['trainable_parameters']} parameters, crop {CROP_CHW}",
        flush=True,
    )

    results = []
    for batch_size in args.batch_sizes:
        images, masks = make_batch(batch_size, device, args.seed)
        for layout in ("contiguous", "channels_last"):
            memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            model = model.to(memory_format=memory_format)
            batch = images.contiguous(memory_format=memory_format)
            for precision, autocast in settings(device):
                timings = time_steps(model, batch, masks, args.repeats, autocast)
                rate = batch_size * len(timings) / sum(timings)
                results.append(
                    {
                        "batch_size": batch_size,
                        "layout": layout,
                        "precision": precision,
                        "step_s": [round(t, 4) for t in timings],
                        "samples_per_s": round(rate, 1),
                        "best_samples_per_s": round(batch_size / min(timings), 1),
                    }
                )
                print(f"  batch {batch_size:>4} {layout:>13} {precision:>13}: {rate:>9.1f} samples/s", flush=True)
        del images, masks

    print(f"\n{'batch':>6} {'layout':>13} {'precision':>13} {'samples/s':>10} {'best/s':>9}")
    for r in results:
        print(
            f"{r['batch_size']:>6} {r['layout']:>13} {r['precision']:>13} "
            f"{r['samples_per_s']:>10.1f} {r['best_samples_per_s']:>9.1f}"
        )
    record = {
        "benchmark": "seg_model",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": model.describe(),
        "crop_chw": list(CROP_CHW),
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
