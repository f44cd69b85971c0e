"""Batched data augmentation on the training device: a random affine per sample, then noise.

The book augments on the CPU one chunk at a time in DataLoader workers. Its chapter-14 GPU
version draws one random transform for the whole batch, and its offset never reaches the
translation column of the matrix. Here every sample gets its own matrix, all samples of a
batch are resampled at once (one sampling grid, `affine_grid`, which equals `F.affine_grid`,
and one `F.grid_sample` call) on whatever device the batch is on, and the random numbers come
from an explicit `torch.Generator`, so the same seed gives the same batch again on the same
device (CPU and CUDA generators give different streams, so not the same batch on both).

Dtypes
------
Chunks travel from the DataLoader as int16 HU (half the bytes of float32) and become float on
the device (`p2ch.datasets.to_device_batch`). `augment_batch` takes float32, float64, bfloat16
or float16 and returns the same dtype; int16 input is converted to float32 first (and the
result is float32). Half-precision batches are resampled in float32, because a sampling grid
in bfloat16 would place voxels only to about a fifth of a voxel.

Axis order (read this before touching a matrix)
-----------------------------------------------
A batch is `(N, 1, I, R, C)`: index (slice, head-foot), row, col, which torch calls
`(N, C, D, H, W)`. `F.affine_grid` works in the reverse order, `(x, y, z) = (W, H, D) =
(col, row, index)`, in normalised coordinates where -1 and +1 are the outer faces of the first
and last voxel (`align_corners=False`). So in a `(N, 3, 4)` matrix

    row / column 0  ->  col   (x, W)
    row / column 1  ->  row   (y, H)
    row / column 2  ->  index (z, D)
    column 3        ->  translation, in normalised units (1.0 = half the extent of that axis)

The matrix maps a position `p` of the *output* to the position `q = A @ p + t` of the *input*
that it shows (this is what `affine_grid` defines). Content therefore moves the opposite way:
a translation `t` moves the content by `-t`, a scale `s` makes it `1/s` times as large.

The random transform is `q = Rot @ Scale @ Flip @ p + t`:

- flip: each axis independently with probability 0.5 (its diagonal entry becomes -1);
- scale: each axis independently by a factor uniform in `[1 - scale, 1 + scale]`;
- rotate: an angle uniform in `[0, 2π)` in the row/col plane, i.e. about the head-foot axis
  (the index axis is left alone, because slice spacing differs from row/col spacing);
- offset: each axis independently, uniform in `[-offset, +offset]` normalised units
  (0.1 is ±2.4 voxels on a 48-voxel axis, ±1.6 on a 32-voxel one).

Rows and cols share one spacing in CT, so the rotation is built rigid in voxel units; on a
square row/col plane (the 48 × 48 chunk) that is the plain rotation matrix in normalised units.
Outside the chunk the border voxels are repeated (`padding_mode='border'`), as the book does.
When only flips are on, they are applied with `torch.flip`, which is exact, instead of through
a sampling grid (which is off by rounding).

2D (segmentation, chapter 13)
-----------------------------
`augment_2d` does the same for `(N, C, H, W)` slices (C = the slice and its neighbours) and
their `(N, 1, H, W)` bool nodule masks: one random `(N, 2, 3)` matrix per sample, axes
`(x, y) = (col, row)`, `q = Rot @ Scale @ Flip @ p + t` as above with the rotation in the only
plane there is. Image and mask go through the same sampling grid, so they stay aligned: the
image bilinearly, the mask as 0/1 floats, bilinearly, then thresholded at 0.5, so it stays
binary and its edge moves with the image's edge (`padding_mode='border'` for both). Noise goes
on the image only. The book's chapter-13 magnitudes (`Augment2dConfig.book()`) are those of
chapter 12 except the offset, 0.03 (±1 pixel on a 64-pixel crop); the book's 2D version, too,
draws one transform for the whole batch and never applies its offset. `random_crop_2d` cuts a
random `size × size` window per sample (the book's 64 × 64 training crop from 96 × 96).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F

from p2ch.errors import ConfigError, DataFormatError

# The book's magnitudes for its --augment-* switches.
BOOK_OFFSET = 0.1
BOOK_OFFSET_2D = 0.03  # chapter 13 (segmentation); its scale and noise are chapter 12's
BOOK_SCALE = 0.2
BOOK_NOISE_HU = 25.0

# Columns of the (N, 10) uniform draw behind `random_affine`: all are always drawn, so turning
# one augmentation on or off never changes the random numbers behind the others.
_FLIP = slice(0, 3)
_OFFSET = slice(3, 6)
_SCALE = slice(6, 9)
_ANGLE = 9
_DRAWS = 10
# The same for `random_affine_2d`'s (N, 7) draw, columns in (x, y) = (col, row) order.
_FLIP_2D = slice(0, 2)
_OFFSET_2D = slice(2, 4)
_SCALE_2D = slice(4, 6)
_ANGLE_2D = 6
_DRAWS_2D = 7

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_fields(config: AugmentConfig | Augment2dConfig) -> None:
    """Validate a config's fields in place (numbers become float); ConfigError naming the field."""
    kind = type(config).__name__
    for name in ("flip", "rotate"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{kind}.{name} is {getattr(config, name)!r}; expected True or False")
    limits = {
        "offset": (0.0, 1.0, "at most 1 (a whole half-extent)"),
        "scale": (0.0, 0.99, "below 1 (a factor 1 - scale must stay positive)"),
        "noise": (0.0, math.inf, "a finite number of HU"),
    }
    for name, (low, high, what) in limits.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{kind}.{name} is {value!r}; expected a number >= 0, {what}")
        if not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(f"{kind}.{name} is {value!r}; expected a number >= 0, {what}")
        object.__setattr__(config, name, float(value))


_S = TypeVar("_S", bound="_AugmentSettings")


@dataclasses.dataclass(frozen=True)
class _AugmentSettings:
    """Flip, offset, scale, rotation and noise switches and magnitudes (shared by the 3D and 2D configs)."""

    _BOOK_OFFSET: ClassVar[float] = BOOK_OFFSET

    flip: bool = False
    offset: float = 0.0
    scale: float = 0.0
    rotate: bool = False
    noise: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self)

    @classmethod
    def none(cls: type[_S]) -> _S:
        """No augmentation at all."""
        return cls()

    @classmethod
    def book(cls: type[_S]) -> _S:
        """The book's `--augmented`: flip, the book's offset, scale 0.2, rotate, noise 25 HU."""
        return cls(flip=True, offset=cls._BOOK_OFFSET, scale=BOOK_SCALE, rotate=True, noise=BOOK_NOISE_HU)

    @classmethod
    def from_flags(
        cls: type[_S],
        *,
        augmented: bool = False,
        flip: bool = False,
        offset: bool = False,
        scale: bool = False,
        rotate: bool = False,
        noise: bool = False,
    ) -> _S:
        """The config for the book's CLI switches, with the book's magnitudes.

        `augmented` (`--augmented`) turns everything on; the others are `--augment-flip`,
        `--augment-offset`, `--augment-scale`, `--augment-rotate` and `--augment-noise`.
        """
        if augmented:
            return cls.book()
        return cls(
            flip=bool(flip),
            offset=cls._BOOK_OFFSET if offset else 0.0,
            scale=BOOK_SCALE if scale else 0.0,
            rotate=bool(rotate),
            noise=BOOK_NOISE_HU if noise else 0.0,
        )

    @property
    def enabled(self) -> bool:
        """True when any augmentation is on."""
        return self.flip or self.resamples or self.noise > 0

    @property
    def resamples(self) -> bool:
        """True when the data must be resampled through a grid (offset, scale or rotation on)."""
        return self.offset > 0 or self.scale > 0 or self.rotate

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for logs and checkpoints."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AugmentConfig(_AugmentSettings):
    """Which augmentations run, and how strongly (all off by default).

    flip: random flip of each axis with probability 0.5.
    offset: largest translation per axis, in affine_grid's normalised units (0.1 = ±10% of the
        half-extent), 0 for none.
    scale: largest relative scale change per axis (0.2 = ±20%), 0 for none; below 1.
    rotate: random rotation by 0..2π about the head-foot axis (in the row/col plane).
    noise: standard deviation of added Gaussian noise, in HU, 0 for none.
    """

    _BOOK_OFFSET: ClassVar[float] = BOOK_OFFSET


def random_affine(
    n: int,
    config: AugmentConfig,
    *,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    shape_irc: Sequence[int] | None = None,
) -> torch.Tensor:
    """One random affine matrix per sample, for `F.affine_grid` (see the module docstring).

    n: number of samples.
    generator: source of the random numbers; they are drawn on the generator's device.
    device: where the result lives (default: the generator's device).
    shape_irc: the chunk's (I, R, C) voxel shape; only R/C matters, to keep the rotation rigid
        in voxels on a non-square row/col plane. None means a square plane.
    Returns theta: (n, 3, 4) `dtype`, axes in (col, row, index) = (x, y, z) order, translation in
        normalised units; the identity for a disabled config.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"random_affine: n is {n!r}; expected a sample count >= 0")
    if not isinstance(config, AugmentConfig):
        raise ConfigError(f"random_affine: config is a {type(config).__name__}; expected an AugmentConfig")
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"random_affine: dtype is {dtype}; expected torch.float32 or torch.float64")
    device = torch.device(device) if device is not None else generator.device
    draw = torch.rand((n, _DRAWS), generator=generator, device=generator.device, dtype=torch.float64)

    # Linear part as per-axis factors (flip sign times scale), in (x, y, z) order.
    factors = torch.ones((n, 3), dtype=torch.float64, device=draw.device)
    if config.flip:
        factors = torch.where(draw[:, _FLIP] < 0.5, -factors, factors)
    if config.scale > 0:
        factors = factors * (1.0 + config.scale * (2.0 * draw[:, _SCALE] - 1.0))
    linear = torch.diag_embed(factors)
    if config.rotate:
        angle = draw[:, _ANGLE] * (2.0 * math.pi)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # x (col) and y (row) have different normalised units when C != R: rotate in voxels,
        # i.e. conjugate by diag(C/2, R/2), which scales the off-diagonal terms by R/C and C/R.
        aspect = 1.0
        if shape_irc is not None:
            if len(shape_irc) != 3 or min(int(s) for s in shape_irc) < 1:
                raise ConfigError(f"random_affine: shape_irc is {tuple(shape_irc)!r}; expected (I, R, C) > 0")
            aspect = int(shape_irc[1]) / int(shape_irc[2])  # R / C
        rotation = torch.eye(3, dtype=torch.float64, device=draw.device).repeat(n, 1, 1)
        rotation[:, 0, 0] = cos
        rotation[:, 0, 1] = -sin * aspect
        rotation[:, 1, 0] = sin / aspect
        rotation[:, 1, 1] = cos
        linear = rotation @ linear
    translation = torch.zeros((n, 3, 1), dtype=torch.float64, device=draw.device)
    if config.offset > 0:
        translation = (config.offset * (2.0 * draw[:, _OFFSET] - 1.0)).unsqueeze(-1)
    theta = torch.cat([linear, translation], dim=2)
    return theta.to(device=device, dtype=dtype)


def _check_batch(batch: Any, what: str) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor):
        raise DataFormatError(
            f"{what}: batch is a {type(batch).__name__}; expected a torch.Tensor (N, 1, I, R, C) of HU"
        )
    if batch.ndim != 5:
        hint = " (add the batch dimension with .unsqueeze(0))" if batch.ndim == 4 else ""
        raise DataFormatError(
            f"{what}: batch has shape {tuple(batch.shape)}; expected 5 dimensions (N, 1, I, R, C){hint}"
        )
    if batch.dtype == torch.int16:
        return batch.float()
    if batch.dtype not in _FLOAT_DTYPES:
        raise DataFormatError(
            f"{what}: batch has dtype {batch.dtype}; expected float32, float64, bfloat16, "
            "float16 or int16 HU (convert with .float())"
        )
    return batch


def _keep_memory_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`out` laid out as `like`: channels_last_3d if `like` is (and not also contiguous), else contiguous."""
    if not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last_3d):
        return out.contiguous(memory_format=torch.channels_last_3d)
    return out.contiguous()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def affine_grid(theta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The sampling grid of `F.affine_grid(theta, shape, align_corners=False)`, built by broadcasting.

    `F.affine_grid` materialises an (N, I, R, C, 4) grid of homogeneous coordinates and
    multiplies it by the matrices; adding three broadcast (col, row, index) terms to the
    translation writes the (N, I, R, C, 3) result once instead (5× faster on a CPU, and less
    memory traffic on a GPU). Equal to `F.affine_grid` up to float rounding (tested).

    theta: (N, 3, 4) float, (col, row, index) order.
    shape: the batch's (N, channels, I, R, C).
    Returns (N, I, R, C, 3) in theta's dtype and device, last axis (x, y, z) = (col, row, index).
    """
    n, _, size_i, size_r, size_c = (int(s) for s in shape)
    if theta.ndim != 3 or tuple(theta.shape) != (n, 3, 4):
        raise DataFormatError(
            f"affine_grid: theta has shape {tuple(theta.shape)}; expected ({n}, 3, 4) "
            f"for a batch of shape {tuple(shape)}"
        )
    a = theta[:, None, None, None]  # (N, 1, 1, 1, 3, 4): column k of the matrix is a[..., k]

    def centres(size: int) -> torch.Tensor:  # normalised voxel centres, align_corners=False
        return (torch.arange(size, dtype=theta.dtype, device=theta.device) * 2 + 1) / size - 1

    grid = centres(size_c).view(1, 1, 1, size_c, 1) * a[..., 0] + a[..., 3]
    grid = grid + centres(size_r).view(1, 1, size_r, 1, 1) * a[..., 1]
    return grid + centres(size_i).view(1, size_i, 1, 1, 1) * a[..., 2]


def apply_affine(batch: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample each sample through its own affine matrix (trilinear, border padding).

    batch: (N, 1, I, R, C) float HU (int16 is converted to float32).
    theta: (N, 3, 4) float, in `F.affine_grid`'s (col, row, index) order (module docstring).
    Returns (N, 1, I, R, C) in the batch's float dtype, on its device; half precision is
        resampled in float32.
    """
    x = _check_batch(batch, "apply_affine")
    if not isinstance(theta, torch.Tensor) or theta.ndim != 3 or tuple(theta.shape[1:]) != (3, 4):
        found = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise DataFormatError(f"apply_affine: theta is {found}; expected a (N, 3, 4) tensor of affine matrices")
    if theta.shape[0] != x.shape[0]:
        raise DataFormatError(
            f"apply_affine: theta holds {theta.shape[0]} matrices for a batch of {x.shape[0]}; expected one per sample"
        )
    if x.shape[0] == 0:
        return x
    work = _compute_dtype(x.dtype)
    grid = affine_grid(theta.to(device=x.device, dtype=work), tuple(x.shape))
    out = F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _keep_memory_format(out.to(x.dtype), x)


def flip_batch(batch: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip each sample along the axes its row of `flips` selects, exactly (no resampling).

    batch: (N, 1, I, R, C) float HU (int16 is converted to float32).
    flips: (N, 3) bool, columns in (col, row, index) order like the affine matrices.
    Returns (N, 1, I, R, C), same dtype as the (float) batch.
    """
    x = _check_batch(batch, "flip_batch")
    if not (isinstance(flips, torch.Tensor) and flips.dtype == torch.bool and tuple(flips.shape) == (x.shape[0], 3)):
        found = (tuple(flips.shape), flips.dtype) if isinstance(flips, torch.Tensor) else type(flips).__name__
        raise DataFormatError(f"flip_batch: flips is {found}; expected a ({x.shape[0]}, 3) bool tensor")
    flips = flips.to(x.device)
    n, _, size_i, size_r, size_c = x.shape

    def index(size: int, column: int) -> torch.Tensor:  # (N, size): reversed where flipped
        ascending = torch.arange(size, device=x.device)
        return torch.where(flips[:, column : column + 1], size - 1 - ascending, ascending)

    # One gather with broadcast per-sample indices (channels last, so they stay together).
    samples = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    out = x.permute(0, 2, 3, 4, 1)[
        samples,
        index(size_i, 2).view(n, size_i, 1, 1),
        index(size_r, 1).view(n, 1, size_r, 1),
        index(size_c, 0).view(n, 1, 1, size_c),
    ]
    return _keep_memory_format(out.permute(0, 4, 1, 2, 3), x)


def _check_generator(generator: Any, device: torch.device, what: str = "augment_batch") -> None:
    if not isinstance(generator, torch.Generator):
        raise ConfigError(
            f"{what}: generator is a {type(generator).__name__}; expected a torch.Generator(device={str(device)!r})"
        )
    gen_device = generator.device
    same = gen_device.type == device.type and (
        gen_device.index is None or device.index is None or gen_device.index == device.index
    )
    if not same:
        raise ConfigError(
            f"{what}: generator is on {gen_device}, the batch on {device}; create it "
            f"with torch.Generator(device={str(device)!r})"
        )


@torch.no_grad()
def augment_batch(batch: torch.Tensor, config: AugmentConfig, *, generator: torch.Generator) -> torch.Tensor:
    """Augment every sample of a batch with its own random affine, then Gaussian noise.

    batch: (N, 1, I, R, C) float32/float64/bfloat16/float16 HU on any device; int16 HU is
        converted to float32 first.
    config: what to do; a disabled config returns the batch itself, untouched (int16 input
        converted to float32).
    generator: torch.Generator on the batch's device; the matrices (`random_affine`) are drawn
        first, then the noise, so the same seed gives the same result.
    Returns (N, 1, I, R, C) HU, same dtype (float32 for int16 input), device and memory format.
    """
    if not isinstance(config, AugmentConfig):
        raise ConfigError(f"augment_batch: config is a {type(config).__name__}; expected an AugmentConfig")
    x = _check_batch(batch, "augment_batch")
    if not config.enabled or x.shape[0] == 0:
        return x
    _check_generator(generator, x.device)
    theta = random_affine(x.shape[0], config, generator=generator, device=x.device, shape_irc=tuple(x.shape[2:]))
    if config.resamples:
        out = apply_affine(x, theta)
    elif config.flip:
        flips = torch.diagonal(theta[:, :, :3], dim1=1, dim2=2) < 0
        out = flip_batch(x, flips)
    else:
        out = x
    if config.noise > 0:
        work = _compute_dtype(x.dtype)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=work)
        noisy = noise.mul_(config.noise).add_(out.to(work))
        out = _keep_memory_format(noisy.to(x.dtype), x)
    return out


# ---------------------------------------------------------------------------------------------
# 2D: slices and their masks (segmentation)


@dataclasses.dataclass(frozen=True)
class Augment2dConfig(_AugmentSettings):
    """Which 2D augmentations run, and how strongly (all off by default).

    flip: random flip of rows and of cols, each with probability 0.5.
    offset: largest translation per axis, in affine_grid's normalised units (0.03 = ±3% of the
        half-extent, ±1 pixel on 64), 0 for none.
    scale: largest relative scale change per axis (0.2 = ±20%), 0 for none; below 1.
    rotate: random rotation by 0..2π in the slice plane.
    noise: standard deviation of Gaussian noise added to the image (never the mask), in HU.
    """

    _BOOK_OFFSET: ClassVar[float] = BOOK_OFFSET_2D  # chapter 13: ±3%, about ±1 pixel of a 64 crop


def random_affine_2d(
    n: int,
    config: Augment2dConfig,
    *,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    shape_hw: Sequence[int] | None = None,
) -> torch.Tensor:
    """One random 2D affine matrix per sample, for `F.affine_grid` (module docstring, 2D).

    n: number of samples. generator: source of the random numbers (drawn on its device).
    device: where the result lives (default: the generator's device).
    shape_hw: the slices' (H, W), to keep the rotation rigid in pixels on a non-square slice;
        None means square.
    Returns theta: (n, 2, 3) `dtype`, axes in (col, row) = (x, y) order, translation in normalised
        units; the identity for a disabled config.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"random_affine_2d: n is {n!r}; expected a sample count >= 0")
    if not isinstance(config, Augment2dConfig):
        raise ConfigError(f"random_affine_2d: config is a {type(config).__name__}; expected an Augment2dConfig")
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"random_affine_2d: dtype is {dtype}; expected torch.float32 or torch.float64")
    aspect = 1.0  # H / W
    if shape_hw is not None:
        if len(shape_hw) != 2 or min(int(s) for s in shape_hw) < 1:
            raise ConfigError(f"random_affine_2d: shape_hw is {tuple(shape_hw)!r}; expected (H, W) > 0")
        aspect = int(shape_hw[0]) / int(shape_hw[1])
    device = torch.device(device) if device is not None else generator.device
    draw = torch.rand((n, _DRAWS_2D), generator=generator, device=generator.device, dtype=torch.float64)

    factors = torch.ones((n, 2), dtype=torch.float64, device=draw.device)
    if config.flip:
        factors = torch.where(draw[:, _FLIP_2D] < 0.5, -factors, factors)
    if config.scale > 0:
        factors = factors * (1.0 + config.scale * (2.0 * draw[:, _SCALE_2D] - 1.0))
    linear = torch.diag_embed(factors)
    if config.rotate:
        angle = draw[:, _ANGLE_2D] * (2.0 * math.pi)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Rigid in pixels: conjugated by diag(W/2, H/2), as in `random_affine`.
        rotation = torch.stack([torch.stack([cos, -sin * aspect], 1), torch.stack([sin / aspect, cos], 1)], 1)
        linear = rotation @ linear
    translation = torch.zeros((n, 2, 1), dtype=torch.float64, device=draw.device)
    if config.offset > 0:
        translation = (config.offset * (2.0 * draw[:, _OFFSET_2D] - 1.0)).unsqueeze(-1)
    return torch.cat([linear, translation], dim=2).to(device=device, dtype=dtype)


def _check_slices(images: Any, masks: Any, what: str) -> torch.Tensor:
    """Validate an (images, masks) pair; return the images as float (int16 becomes float32)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataFormatError(f"{what}: images is {found}; expected a (N, C, H, W) float tensor of HU")
    n, _, h, w = images.shape
    if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (n, 1, h, w) or masks.dtype != torch.bool:
        found = (tuple(masks.shape), masks.dtype) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise DataFormatError(f"{what}: masks is {found}; expected a ({n}, 1, {h}, {w}) bool tensor")
    if masks.device != images.device:
        raise DataFormatError(f"{what}: images are on {images.device}, masks on {masks.device}; expected one device")
    if images.dtype == torch.int16:
        return images.float()
    if images.dtype not in _FLOAT_DTYPES:
        raise DataFormatError(
            f"{what}: images have dtype {images.dtype}; expected float32, float64, bfloat16, float16 or int16 HU"
        )
    return images


def _keep_memory_format_2d(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`out` laid out as `like`: channels_last if `like` is (and not also contiguous), else contiguous."""
    if not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def _flip_2d(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) flipped per sample: flips (N, 2) bool, columns (col, row). Exact."""
    n = x.shape[0]
    out = torch.where(flips[:, 0].view(n, 1, 1, 1), x.flip(3), x)
    return torch.where(flips[:, 1].view(n, 1, 1, 1), out.flip(2), out)


@torch.no_grad()
def augment_2d(
    images: torch.Tensor, masks: torch.Tensor, config: Augment2dConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment slices and their masks with one random affine per sample, then noise on the image.

    images: (N, C, H, W) float32/float64/bfloat16/float16 HU (int16 becomes float32), any device.
    masks: (N, 1, H, W) bool, on the same device.
    config: what to do; a disabled config returns the inputs untouched.
    generator: torch.Generator on their device; the matrices are drawn first, then the noise.
    Returns (images (N, C, H, W) same dtype and memory format, masks (N, 1, H, W) bool).
    """
    if not isinstance(config, Augment2dConfig):
        raise ConfigError(f"augment_2d: config is a {type(config).__name__}; expected an Augment2dConfig")
    x = _check_slices(images, masks, "augment_2d")
    if not config.enabled or x.shape[0] == 0:
        return x, masks
    _check_generator(generator, x.device, "augment_2d")
    theta = random_affine_2d(x.shape[0], config, generator=generator, device=x.device, shape_hw=tuple(x.shape[2:]))
    work = _compute_dtype(x.dtype)
    out, out_masks = x, masks
    if config.resamples:
        grid = F.affine_grid(theta.to(work), list(x.shape), align_corners=False)
        out = F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode="border", align_corners=False)
        warped = F.grid_sample(masks.to(work), grid, mode="bilinear", padding_mode="border", align_corners=False)
        out_masks = warped > 0.5
    elif config.flip:
        flips = torch.diagonal(theta[:, :, :2], dim1=1, dim2=2) < 0
        out, out_masks = _flip_2d(x, flips), _flip_2d(masks, flips)
    if config.noise > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=work)
        out = noise.mul_(config.noise).add_(out.to(work))
    return _keep_memory_format_2d(out.to(x.dtype), x), out_masks.contiguous()


def random_crop_2d(
    images: torch.Tensor, masks: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the same random `size × size` window out of each sample's image and mask.

    images: (N, C, H, W) HU, any float dtype or int16 (kept), any device.
    masks: (N, 1, H, W) bool, same device.
    size: crop side in pixels, 1..min(H, W). Each sample's top-left corner is uniform over the
        (H - size + 1) × (W - size + 1) positions, drawn from `generator` (on their device).
    Returns (images (N, C, size, size) same dtype and memory format, masks (N, 1, size, size) bool).
    """
    _check_slices(images, masks, "random_crop_2d")  # int16 is accepted and kept
    n, _, h, w = images.shape
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(h, w):
        raise ConfigError(f"random_crop_2d: size is {size!r}; expected an int from 1 to {min(h, w)} for {h}×{w} slices")
    _check_generator(generator, images.device, "random_crop_2d")
    draw = torch.rand((n, 2), generator=generator, device=generator.device, dtype=torch.float64).to(images.device)
    room = torch.tensor([h - size + 1, w - size + 1], dtype=torch.float64, device=images.device)
    corner = torch.minimum((draw * room).long(), (room - 1).long())  # (N, 2): top row, left col
    span = torch.arange(size, device=images.device)
    rows = (corner[:, 0:1] + span).view(n, size, 1)
    cols = (corner[:, 1:2] + span).view(n, 1, size)
    samples = torch.arange(n, device=images.device).view(n, 1, 1)

    def cut(x: torch.Tensor) -> torch.Tensor:  # one gather, channels last so they stay together
        return x.permute(0, 2, 3, 1)[samples, rows, cols].permute(0, 3, 1, 2)

    return _keep_memory_format_2d(cut(images), images), cut(masks).contiguous()
