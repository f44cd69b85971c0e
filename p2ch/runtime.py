"""What every command that runs a model needs around its work: device, mixed precision,
distributed ranks, logging.

- `resolve_device` / `resolve_amp`: the --device and --amp spellings to torch objects.
- `DistInfo`, `init_distributed`, `gather_cat`: torchrun's process group (NCCL on GPUs, gloo on
  CPUs) and gathering per-sample results of uneven length across ranks.
(A command's logging set-up and the wrapper that turns its expected failures into one line are in
`p2ch.cli`, which needs no torch.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist

from p2ch.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda|cuda:N → a torch.device (under torchrun, auto and cuda mean cuda:LOCAL_RANK)."""
    under_torchrun = "WORLD_SIZE" in os.environ
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank if under_torchrun else torch.cuda.current_device())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {name} asked for CUDA, but torch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank if under_torchrun else 0)
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """--amp auto|off|bf16|fp16 → the autocast dtype, or None for float32.

    auto: bf16 on CUDA (fp16 where bf16 is unsupported), off on the CPU.
    """
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU")
    if mode not in ("bf16", "fp16"):
        raise ConfigError(f"--amp {mode!r}: expected one of auto, off, bf16, fp16")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype` on `device`'s type, or a no-op context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place among torchrun's ranks (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_rank() -> int:
    """torchrun's LOCAL_RANK (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank())


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (nothing for a single process).

    Ranks finish at different times (only rank 0 computes CPM and writes); leaving the group while
    another rank still works can make gloo abort that rank with "connection closed by peer".
    """
    if info.enabled:
        dist.barrier()


def close_distributed(info: DistInfo) -> None:
    """Leave the process group joined by `init_distributed` (nothing for a single process)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather_cat(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate a tensor along dim 0 from every rank, in rank order; ranks may hold different lengths."""
    if not info.enabled:
        return tensor
    if tensor.dtype == torch.bool:  # gloo cannot gather bool tensors
        return gather_cat(tensor.to(torch.uint8), info).bool()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work on `device` (so a wall-clock reading covers it); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` for a single process."""
    if not info.enabled:
        return [obj]
    parts: list[Any] = [None] * info.world_size
    dist.all_gather_object(parts, obj)
    return parts
