"""What every command that runs a model needs around its work: device, mixed precision,
distributed ranks, logging.

- `resolve_device` / `resolve_amp`: the --device and --amp spellings to torch objects.
- `configure_backends`: the backend speed switches (cuDNN autotuning) every command sets the same way.
- `device_type_of`: whether a --device spelling means CUDA (for device-dependent defaults).
- `loader_shm_bytes` / `check_shared_memory` / `shared_memory_errors`: DataLoader workers hand
  batches over in shared memory (/dev/shm); too little of it (a container's 64 MB default) ends
  in "Bus error" — warned about at start-up, and the crash itself turned into one line.
- `DistInfo`, `init_distributed`, `gather_cat`: torchrun's process group (NCCL on GPUs, gloo on
  CPUs) and gathering per-sample results of uneven length across ranks.
(A command's logging set-up and the wrapper that turns its expected failures into one line are in
`p2ch.cli`, which needs no torch.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from p2ch.batchbuffers import buffer_slots
from p2ch.errors import ConfigError, P2chError

log = logging.getLogger(__name__)

SHM_PATH = "/dev/shm"
SHM_ADVICE = (
    "lower --num-workers or --batch-size (training: or --batch-buffers fresh), or give the container more "
    "shared memory (docker run --ipc=host, or --shm-size=16g)"
)


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


def resolve_amp(mode: str, device: torch.device, *, cpu_bf16: bool = False) -> torch.dtype | None:
    """--amp auto|off|bf16|fp16 → the autocast dtype, or None for float32.

    auto: bf16 on CUDA (fp16 where bf16 is unsupported); on the CPU off, unless `cpu_bf16` (inference
    commands that opt in) and the CPU computes bf16 natively (`cpu_bf16_native`), where it is bf16.
    """
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if cpu_bf16 and device.type == "cpu" and cpu_bf16_native() else None
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU")
    if mode not in ("bf16", "fp16"):
        raise ConfigError(f"--amp {mode!r}: expected one of auto, off, bf16, fp16")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (AVX512-BF16 or AMX, as `lscpu` lists
    `avx512_bf16` / `amx_bf16`). Elsewhere torch emulates bf16 on the CPU (not measured here; expect it slower).
    The checks are torch's own (private, so a torch without them counts as no)."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(bool(check()) for check in checks if check is not None)


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` (CUDA) computes bfloat16 natively (compute capability 8.0+: A100, H100, …).

    torch's `is_bf16_supported()` also says yes, by default, where bf16 is only emulated (V100, T4):
    slower than fp16 there, so --amp auto must pick fp16 on them. Its `including_emulation` switch
    is newer than the oldest torch setup.cfg allows; without it, the capability decides.
    """
    check = torch.cuda.is_bf16_supported
    if "including_emulation" in inspect.signature(check).parameters:
        return bool(check(including_emulation=False))
    if torch.version.hip:  # ROCm: every supported AMD GPU computes bf16
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def configure_backends(device: torch.device, cudnn_benchmark: bool = True) -> None:
    """Set the backend speed switches for running models on `device` (nothing on the CPU).

    cudnn_benchmark: let cuDNN time its convolution algorithms for each new input shape and keep
    the fastest (--cudnn-benchmark on, the default; a few slow batches at the start, then faster
    3D convolutions). off: cuDNN's heuristic choice, the same in every run (for reproducibility).
    TF32 is left at torch's defaults on purpose: cuDNN convolutions already use TF32 in float32
    (torch.backends.cudnn.allow_tf32 is True by default), AMP runs them in bf16/fp16 anyway, and the
    one matmul (the classifier's 1152→2 head) is tiny and kept in full float32 so that scores rank
    without ties.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)


def device_type_of(name: str) -> str:
    """The kind of device ("cuda" or "cpu") --device `name` will resolve to (no error for a bad name:
    `resolve_device` reports that later)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(name).startswith("cuda") else "cpu"


class SharedMemoryError(P2chError):
    """DataLoader workers ran out of shared memory (/dev/shm) for the batches they hand over."""


def loader_shm_bytes(
    batch_bytes: int, num_workers: int, prefetch_factor: int | None = None, reuse: bool = False
) -> int:
    """Shared memory one DataLoader's batches take: each worker keeps `prefetch_factor` (torch's default
    2) batches of `batch_bytes` ready, in /dev/shm, until the main process takes them; with `reuse`
    (`p2ch.batchbuffers`) each worker keeps `buffer_slots(prefetch_factor)` batch buffers for the
    loader's lifetime instead. 0 without workers (batches are then made in the main process's memory).

    Without reuse a run's loaders take turns (persistent workers prefetch only while their own loader
    is iterated), so a run needs the largest of its loaders' figures; with reuse, their sum.
    """
    if num_workers <= 0:
        return 0
    per_worker = buffer_slots(prefetch_factor) if reuse else (2 if prefetch_factor is None else prefetch_factor)
    return int(batch_bytes) * num_workers * per_worker


def check_shared_memory(needed_bytes: int, what: str, path: str = SHM_PATH) -> str | None:
    """Warn (and return the warning) when `needed_bytes` of batches in flight will not fit the free
    space of `path` (Linux's /dev/shm); None when they fit, or where there is no such folder.

    what: the settings that ask for it, for the message (e.g. "--batch-size 1024, --num-workers 16").
    """
    if needed_bytes <= 0 or not sys.platform.startswith("linux"):
        return None
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    free = stat.f_bavail * stat.f_frsize
    if needed_bytes <= free:
        return None
    message = (
        f"DataLoader workers will keep about {needed_bytes / 2**20:,.0f} MiB of batches in shared memory "
        f"({what}), but {path} has only {free / 2**20:,.0f} MiB free: workers may die with 'Bus error'; "
        f"{SHM_ADVICE}"
    )
    log.warning("%s", message)
    return message


def check_loader_shared_memory(
    sample_bytes: Sequence[int], batch_size: int, num_workers: int, path: str = SHM_PATH, reuse: bool = False
) -> str | None:
    """`check_shared_memory` for a run's loaders, warned once per machine (local rank 0).

    sample_bytes: the bytes one sample of each loader hands over (e.g. an int16 chunk and its label).
    reuse: the loaders reuse batch buffers (see `loader_shm_bytes`: then their figures add up, else
    the largest counts), times the processes torchrun started on this machine ($LOCAL_WORLD_SIZE),
    which share its /dev/shm.
    """
    if local_rank() != 0 or not sample_bytes:
        return None
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    figures = [loader_shm_bytes(b * batch_size, num_workers, reuse=reuse) for b in sample_bytes]
    needed = (sum(figures) if reuse else max(figures)) * processes
    what = f"--batch-size {batch_size}, --num-workers {num_workers}, " + (
        f"{buffer_slots()} reused batch buffers per worker and loader" if reuse else "prefetch 2 batches per worker"
    )
    if processes > 1:
        what += f", {processes} processes on this machine"
    return check_shared_memory(needed, what, path)


def is_shm_failure(exc: BaseException) -> bool:
    """Whether `exc` is torch's report of a DataLoader worker killed by a bus error (out of /dev/shm)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and "DataLoader worker" in text and "Bus error" in text


@contextlib.contextmanager
def shared_memory_errors(what: str = "") -> Iterator[None]:
    """Within the block, a DataLoader worker killed by "Bus error" (shared memory exhausted) raises
    `SharedMemoryError` with one line of advice instead of torch's RuntimeError.

    what: the settings in force, for the message (e.g. "--batch-size 1024, --num-workers 16").
    """
    try:
        yield
    except RuntimeError as exc:
        if not is_shm_failure(exc):
            raise
        settings = f" with {what}" if what else ""
        raise SharedMemoryError(
            f"a DataLoader worker was killed by a bus error: the batches in flight{settings} did not fit in "
            f"shared memory ({SHM_PATH}); {SHM_ADVICE}"
        ) from None


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
