"""`UNet` and `UNetWrapper`: the 2D segmentation model of the book's chapter 13, written anew.

Layout (module names are part of the checkpoint format; keep them):

    UNetWrapper
      input_batchnorm   BatchNorm2d(in_channels) on the raw HU input
      unet              UNet (below)
      (sigmoid)         probabilities; no parameters
    UNet
      down_path[i]      i = 0..depth-1: ConvBlock, 2**(wf+i) filters; a 2×2 max-pool before each
                        level but the first
      up_path[j]        j = 0..depth-2, from the bottom up: UpBlock to 2**(wf+depth-2-j) filters
                        (up-convolution, concatenation with the skip of the same level, ConvBlock)
      last              Conv2d 1×1 to n_classes logits

A ConvBlock is (Conv2d 3×3 [+ BatchNorm2d] + ReLU) twice; with batch norm the convolutions have
no bias (the norm's shift replaces it), and levels are joined by 2×2 max-pooling. `block_order="book"`
builds the book's UNet (its util/unet.py) instead, so that the book's trained weights compute what
they computed there: (Conv2d 3×3 with bias + ReLU [+ BatchNorm2d]) twice, the norm after the ReLU,
and 2×2 average pooling between levels. The module names are the same; with batch norm the state
dicts differ (the book's convolutions have biases, its norms sit at block indices 2 and 5).
`up_mode="upconv"` up-samples with a learned ConvTranspose2d (2×2, stride 2); `"upsample"` with
bilinear interpolation followed by a 1×1 convolution. With `padding=True` every 3×3 convolution pads
by 1, so the output has the input's H × W; H and W must then be multiples of 2**(depth-1), so that
every pooled size is whole and each up-sampled map lines up with its skip (`check_input_size`). With
`padding=False` the convolutions are unpadded, as in the original UNet paper: the output is smaller
than the input and each skip is centre-cropped to the up-sampled map.

The model works under `torch.autocast` (logits and probabilities come out in float32) and with
`memory_format=torch.channels_last`. `inference_copy` gives an eval-only copy that computes the same
probabilities with less work (batch norms folded, skips joined without concatenation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from p2ch.config import BLOCK_ORDERS
from p2ch.errors import ConfigError, DataFormatError
from p2ch.model import arch_signature, count_parameters, float32_head, fuse_conv_batchnorm

UNET_ARCH = "UNetWrapper-v1"
UP_MODES = ("upconv", "upsample")
# The book's order computes differently with the same module names (and, without batch norm, the same
# state dict): its architecture tag says so.
BOOK_ARCH_SUFFIX = "-book"


def check_input_size(h: int, w: int, depth: int, *, padding: bool = True) -> tuple[int, int]:
    """Refuse an input H × W that a UNet of this depth cannot take; return the output (H, W).

    h, w: input rows and columns (pixels). depth: UNet levels (depth-1 poolings).
    padding: True for padded convolutions (output = input size; H and W must be multiples of
        2**(depth-1)); False for unpadded ones (each size must stay even before every pooling
        and positive to the end).
    Raises ConfigError naming the size, the depth and a size that works.
    """
    for name, value in (("h", h), ("w", w), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"check_input_size: {name} is {value!r}; expected a positive int")
    if padding:
        multiple = 2 ** (depth - 1)
        if h % multiple or w % multiple:
            down_h, down_w = (max(multiple, s // multiple * multiple) for s in (h, w))
            up_h, up_w = (-(-s // multiple) * multiple for s in (h, w))
            raise ConfigError(
                f"UNet: input {h}×{w} (H×W) is not a multiple of 2**(depth-1) = {multiple} for depth {depth}; "
                f"crop or pad it to a multiple of {multiple}, e.g. {down_h}×{down_w} or {up_h}×{up_w}"
            )
        return h, w
    return _unpadded_output(h, depth, "H"), _unpadded_output(w, depth, "W")


def receptive_radius(depth: int, up_mode: str = "upconv") -> int:
    """How many pixels away from an output pixel a padded UNet of this depth still looks: the exact reach.

    Found by following which pixels an output pixel needs back through the network, level by level: the
    two 3×3 convolutions of each block (±2 pixels of its level), the 2×2 pooling (a pixel of level l is 2
    of level l - 1), and on the way up the ×2 up-sampling (a 2×2 up-convolution reads 1 pixel of the level
    below, bilinear up-sampling 2). Each skip adds its level's down path. How far that reaches depends on
    where the pixel lies on the 2**(depth-1) pooling grid, so every position on it is followed and the
    farthest reach on either side is returned. A crop that starts on that grid and leaves this many pixels
    of real image around a region gives that region the same output as the whole image (depth 3: 23
    pixels; summing each step's worst case would say 29).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"receptive_radius: depth is {depth!r}; expected an int >= 1")
    if up_mode not in UP_MODES:
        raise ConfigError(f"receptive_radius: up_mode is {up_mode!r}; expected one of {', '.join(UP_MODES)}")
    origin = 4 * 2**depth  # any pixel far from the edges; all its positions on the pooling grid are tried
    reach = 0
    for pixel in range(origin, origin + 2 ** (depth - 1)):
        low, high = _needed_input(0, pixel, pixel, depth, up_mode, up=depth > 1)
        reach = max(reach, pixel - low, high - pixel)
    return reach


def _needed_input(level: int, low: int, high: int, depth: int, up_mode: str, up: bool) -> tuple[int, int]:
    """The input pixels [low', high'] (level 0) that pixels [low, high] of a block's output need.

    up: the up path's block at `level` (whose output is at `level`; the UNet's output is the up block of
    level 0 when depth > 1); else the down path's block at `level`.
    """
    if not up:  # down block: two 3×3 convolutions on the pooled output of the finer level before it
        low, high = low - 2, high + 2
        if level == 0:
            return low, high
        return _needed_input(level - 1, 2 * low, 2 * high + 1, depth, up_mode, up=False)
    if level == depth - 1:  # the bottom is the last down block
        return _needed_input(level, low, high, depth, up_mode, up=False)
    low, high = low - 2, high + 2  # the up block's two 3×3 convolutions over [up-sampled, skip]
    skip = _needed_input(level, low, high, depth, up_mode, up=False)
    if up_mode == "upconv":  # pixel q of level l comes from pixel q // 2 of level l + 1
        below = (low // 2, high // 2)
    else:  # bilinear, align_corners=False: pixel q reads floor(q / 2 - 1/4) and the next one
        below = (math.floor(low / 2 - 0.25), math.floor(high / 2 - 0.25) + 1)
    from_below = _needed_input(level + 1, *below, depth, up_mode, up=True)
    return min(skip[0], from_below[0]), max(skip[1], from_below[1])


def _unpadded_output(size: int, depth: int, axis: str) -> int:
    """Output length of one axis through unpadded convolutions; ConfigError where it breaks."""
    out = size
    for level in range(depth):
        out -= 4  # two unpadded 3×3 convolutions
        if out < 1 or (level < depth - 1 and out % 2):
            raise ConfigError(
                f"UNet: input {axis} = {size} does not fit depth {depth} with padding=False (it becomes "
                f"{out} at level {level}; expected a positive even size before every pooling); "
                "choose another size or use padding=True"
            )
        if level < depth - 1:
            out //= 2
    for _ in range(depth - 1):
        out = out * 2 - 4
        if out < 1:
            raise ConfigError(f"UNet: input {axis} = {size} is too small for depth {depth} with padding=False")
    return out


class ConvBlock(nn.Module):
    """(Conv2d 3×3 [+ BatchNorm2d] + ReLU) twice, or in the book's order (Conv2d 3×3 with bias + ReLU
    [+ BatchNorm2d]) twice: (N, in, H, W) -> (N, out, H', W')."""

    def __init__(self, in_channels: int, out_channels: int, padding: bool, batch_norm: bool, block_order: str = "p2ch"):
        super().__init__()
        book = block_order == "book"
        layers: list[nn.Module] = []
        for channels_in in (in_channels, out_channels):
            layers.append(nn.Conv2d(channels_in, out_channels, 3, padding=int(padding), bias=book or not batch_norm))
            if batch_norm and not book:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            if batch_norm and book:
                layers.append(nn.BatchNorm2d(out_channels))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UpBlock(nn.Module):
    """Up-sample ×2 to `out` channels, concatenate the skip (cropped if larger), ConvBlock."""

    def __init__(
        self, in_channels: int, out_channels: int, up_mode: str, padding: bool, batch_norm: bool, block_order: str
    ):
        super().__init__()
        if up_mode == "upconv":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, kernel_size=1),
            )
        self.conv_block = ConvBlock(out_channels * 2, out_channels, padding, batch_norm, block_order)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        return self.conv_block(torch.cat([up, _cropped_like(skip, up)], dim=1))


def _cropped_like(skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The centre of `skip` as large as `up` (H × W); `skip` itself when they match (padded convolutions)."""
    top = (skip.shape[2] - up.shape[2]) // 2
    left = (skip.shape[3] - up.shape[3]) // 2
    return skip[:, :, top : top + up.shape[2], left : left + up.shape[3]]


class SkipSplitUpBlock(nn.Module):
    """An `UpBlock` for inference that never builds the concatenation: the first convolution over
    [up-sampled map, skip] is the sum of one convolution over each (its weights split along the input
    channels, the bias on the first), then the rest of the block as it was. The same sums, in another
    order; on a CPU the concatenated full-resolution map is a write and a read of twice the channels.
    Built from a trained `UpBlock` (`inference_copy`); it shares that block's up-sampling and later layers.
    """

    def __init__(self, block: UpBlock):
        super().__init__()
        first = block.conv_block.block[0]
        half = first.in_channels // 2
        self.up = block.up
        self.from_up, self.from_skip = (
            nn.Conv2d(half, first.out_channels, first.kernel_size, padding=first.padding, bias=bias)
            for bias in (first.bias is not None, False)
        )
        with torch.no_grad():
            self.from_up.weight.copy_(first.weight[:, :half])
            self.from_skip.weight.copy_(first.weight[:, half:])
            if first.bias is not None:
                self.from_up.bias.copy_(first.bias)
        self.to(device=first.weight.device, dtype=first.weight.dtype)
        self.rest = nn.Sequential(*list(block.conv_block.block)[1:])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        joined = self.from_up(up)
        joined = joined + self.from_skip(_cropped_like(skip, up))
        return self.rest(joined)


def _check_settings(**settings: Any) -> None:
    lows = {"in_channels": 1, "n_classes": 1, "depth": 1, "wf": 0}
    for name, low in lows.items():
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"UNet: {name} is {value!r}; expected an int >= {low}")
    if settings["wf"] + settings["depth"] > 16:
        raise ConfigError(
            f"UNet: wf {settings['wf']} + depth {settings['depth']} gives 2**{settings['wf'] + settings['depth'] - 1} "
            "filters at the bottom; expected wf + depth <= 16"
        )
    for name in ("padding", "batch_norm"):
        if not isinstance(settings[name], bool):
            raise ConfigError(f"UNet: {name} is {settings[name]!r}; expected True or False")
    if settings["up_mode"] not in UP_MODES:
        raise ConfigError(f"UNet: up_mode is {settings['up_mode']!r}; expected one of {', '.join(UP_MODES)}")
    if settings["block_order"] not in BLOCK_ORDERS:
        raise ConfigError(
            f"UNet: block_order is {settings['block_order']!r}; expected one of {', '.join(BLOCK_ORDERS)}"
        )


class UNet(nn.Module):
    """A UNet: `depth` levels with 2**(wf+i) filters at level i, skips joined by concatenation.

    forward(x: (N, in_channels, H, W) float) -> (N, n_classes, H, W) float logits (smaller H × W
    with padding=False, see `check_input_size`), float32 also under autocast: the last 1×1
    convolution runs in float32 (`p2ch.model.float32_head`), as probabilities near a threshold
    would otherwise move in bf16 steps. block_order: "p2ch" or "book" (see the module docstring).
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        depth: int = 3,
        wf: int = 4,
        padding: bool = True,
        batch_norm: bool = True,
        up_mode: str = "upconv",
        block_order: str = "p2ch",
    ):
        super().__init__()
        _check_settings(
            in_channels=in_channels,
            n_classes=n_classes,
            depth=depth,
            wf=wf,
            padding=padding,
            batch_norm=batch_norm,
            up_mode=up_mode,
            block_order=block_order,
        )
        self.depth = depth
        self.padding = padding
        # The book pools with F.avg_pool2d (its util/unet.py); its weights were trained with that.
        self.pool = nn.functional.avg_pool2d if block_order == "book" else nn.functional.max_pool2d
        widths = [2 ** (wf + level) for level in range(depth)]
        self.down_path = nn.ModuleList(
            ConvBlock(c_in, c_out, padding, batch_norm, block_order)
            for c_in, c_out in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.up_path = nn.ModuleList(
            UpBlock(widths[level + 1], widths[level], up_mode, padding, batch_norm, block_order)
            for level in reversed(range(depth - 1))
        )
        self.last = nn.Conv2d(widths[0], n_classes, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # He (kaiming) normal init, counted on the inputs, for the 3×3 convolutions that feed a
        # ReLU: keeps the activations' variance level from block to block, so a deep net starts
        # neither saturated nor dead. The up-convolution (2×2, stride 2) gives each output pixel
        # exactly one kernel tap per input channel, so its fan-in is in_channels, and no ReLU
        # follows it directly: std sqrt(1 / in_channels). The 1×1 convolutions (the upsample
        # path's and the logits) are linear too: std sqrt(1 / fan_in). Biases start at zero;
        # batch norm keeps its default (weight 1, bias 0).
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, 0.0, math.sqrt(1.0 / module.weight.shape[0]))
            elif isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.Conv2d):
                fan_in = module.weight.shape[1] * math.prod(module.kernel_size)
                nn.init.normal_(module.weight, 0.0, math.sqrt(1.0 / fan_in))
            else:
                continue
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(int(x.shape[-2]), int(x.shape[-1]), self.depth, padding=self.padding)
        skips = []
        for level, block in enumerate(self.down_path):
            if level:
                x = self.pool(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottom level has no skip: it is x itself
        for up in self.up_path:
            x = up(x, skips.pop())
        return float32_head(self.last, x)


class UNetWrapper(nn.Module):
    """The book's segmentation model: input batch norm, `UNet`, sigmoid.

    in_channels: CT slices per sample (the book's 7: the slice and 3 either side).
    n_classes: output maps (1: nodule). The rest are `UNet`'s settings (block_order "book": the book's
    own UNet, which its trained weights need).
    forward(x: (N, in_channels, H, W) float HU) -> (N, n_classes, H, W) float32 probability.
    """

    def __init__(
        self,
        in_channels: int = 7,
        n_classes: int = 1,
        depth: int = 3,
        wf: int = 4,
        padding: bool = True,
        batch_norm: bool = True,
        up_mode: str = "upconv",
        block_order: str = "p2ch",
    ):
        super().__init__()
        self.settings = {
            "in_channels": in_channels,
            "n_classes": n_classes,
            "depth": depth,
            "wf": wf,
            "padding": padding,
            "batch_norm": batch_norm,
            "up_mode": up_mode,
            "block_order": block_order,
        }
        _check_settings(**self.settings)
        self.input_batchnorm = nn.BatchNorm2d(in_channels)
        self.unet = UNet(**self.settings)

    def _check_input(self, x: Any) -> None:
        channels = self.settings["in_channels"]
        expected = f"(N, {channels}, H, W) float HU"
        if not isinstance(x, torch.Tensor):
            raise DataFormatError(f"UNetWrapper: input is a {type(x).__name__}; expected a tensor {expected}")
        if x.ndim != 4 or x.shape[1] != channels:
            hint = "; add the batch dimension with x.unsqueeze(0)" if x.ndim == 3 else ""
            raise DataFormatError(f"UNetWrapper: input has shape {tuple(x.shape)}; expected {expected}{hint}")
        if not x.is_floating_point():
            raise DataFormatError(
                f"UNetWrapper: input has dtype {x.dtype}; expected a float tensor (convert int16 HU with .float())"
            )
        check_input_size(int(x.shape[2]), int(x.shape[3]), self.settings["depth"], padding=self.settings["padding"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch of slices.

        x: (N, in_channels, H, W) float HU (any float dtype, contiguous or channels_last).
        Returns (N, n_classes, H, W) probabilities in float32 (float64 for a float64 model and
            input), also under autocast, so Dice sums and thresholds do not suffer half precision.
        """
        self._check_input(x)
        logits = self.unet(self.input_batchnorm(x))
        return torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))

    def describe(self) -> dict[str, Any]:
        """Plain description for logs and checkpoints: architecture, settings, parameter count, signature."""
        return {
            "arch": unet_arch(self.settings["block_order"]),
            **self.settings,
            "trainable_parameters": count_parameters(self),
            "signature": unet_signature(self),
        }


def inference_copy(model: UNetWrapper, *, split_skips: bool = True) -> UNetWrapper:
    """An eval-mode copy of `model` that computes its probabilities (to float rounding) with less work, for
    segmenting CTs: every Conv → BatchNorm pair folded into one convolution (`model.fuse_conv_batchnorm`; the
    book's block order, norm after the ReLU, keeps its norms) and, with `split_skips`, every skip joined
    without concatenation (`SkipSplitUpBlock`). Measured on a 2-core CPU (BENCHMARKS.md): faster in float32,
    no faster in bfloat16, where the two halves' sum is rounded once more; `nodule_analysis` splits only in
    float32 on a CPU (on a GPU the concatenation is cheap next to the convolutions; not measured there).
    `model` is not changed; the copy shares no tensors with it and is not for training (its batch norms
    are gone). ConfigError for anything but a `UNetWrapper`.
    """
    if not isinstance(model, UNetWrapper):
        raise ConfigError(f"inference_copy: expected a UNetWrapper, got a {type(model).__name__}")
    fast = fuse_conv_batchnorm(model)
    if split_skips:
        fast.unet.up_path = nn.ModuleList(SkipSplitUpBlock(block) for block in fast.unet.up_path)
    return fast.requires_grad_(False)


def unet_arch(block_order: str = "p2ch") -> str:
    """The UNet's name tag: 'UNetWrapper-v1', or 'UNetWrapper-v1-book' for the book's block order."""
    if block_order not in BLOCK_ORDERS:
        raise ConfigError(f"unet_arch: block_order is {block_order!r}; expected one of {', '.join(BLOCK_ORDERS)}")
    return UNET_ARCH + (BOOK_ARCH_SUFFIX if block_order == "book" else "")


def unet_signature(model_or_state_dict: nn.Module | dict[str, torch.Tensor], block_order: str | None = None) -> str:
    """`arch_signature` with the UNet's name tag: 'UNetWrapper-v1:<16 hex digits>' ('UNetWrapper-v1-book:…' for
    the book's block order: that of a `UNetWrapper`'s settings, else `block_order`, else p2ch's)."""
    settings = getattr(model_or_state_dict, "settings", None)
    if block_order is None and isinstance(settings, dict):
        block_order = settings.get("block_order")
    return arch_signature(model_or_state_dict, unet_arch(block_order or "p2ch"))
