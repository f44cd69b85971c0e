"""`LunaModel`: the book's 3D CNN that tells nodule candidates from non-nodules.

Layout (module names are part of the checkpoint format; keep them):

    tail_batchnorm   BatchNorm3d(1) on the raw HU input, so the net sees normalised values
    block1..block4   each (Conv3d 3×3×3, padding 1, + ReLU) twice, then MaxPool3d(2);
                     channels 1 → 8 → 16 → 32 → 64
    head_linear      Linear(1152 → 2) on the flattened (64, 2, 3, 3) features

For a (1, 32, 48, 48) chunk that is 222,220 trainable parameters. `forward` returns the logits
and their softmax, both float32. The model works under `torch.autocast` (bfloat16/float16; the
head runs in float32 all the same, see `float32_head`), with
`memory_format=torch.channels_last_3d` (the features are flattened with a reshape, which keeps
the logical (C, D, H, W) order whatever the strides), and under `torch.compile`.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p2ch.errors import ConfigError, DataFormatError

MODEL_ARCH = "LunaModel-v1"
# The stages of `LunaModel` before its head, input to output (each a top-level module).
STAGES = ("tail_batchnorm", "block1", "block2", "block3", "block4")
INPUT_SHAPE_IRC = (32, 48, 48)
_POOLING = 2**4  # four MaxPool3d(2)

# Wrappers that prefix state-dict keys without changing the architecture.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class LunaBlock(nn.Module):
    """Two 3×3×3 convolutions with ReLU, then a 2×2×2 max-pool (halves each spatial axis)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.maxpool(x)


class LunaModel(nn.Module):
    """The book's nodule classifier: input batch norm, four conv blocks, one linear layer.

    in_channels: channels of the input chunk (1 for CT).
    conv_channels: channels of the first block; each later block doubles them.
    """

    def __init__(self, in_channels: int = 1, conv_channels: int = 8):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("conv_channels", conv_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LunaModel: {name} is {value!r}; expected a positive int")
        self.in_channels = in_channels
        self.conv_channels = conv_channels
        self.tail_batchnorm = nn.BatchNorm3d(in_channels)
        self.block1 = LunaBlock(in_channels, conv_channels)
        self.block2 = LunaBlock(conv_channels, conv_channels * 2)
        self.block3 = LunaBlock(conv_channels * 2, conv_channels * 4)
        self.block4 = LunaBlock(conv_channels * 4, conv_channels * 8)
        spatial = math.prod(s // _POOLING for s in INPUT_SHAPE_IRC)
        self.head_linear = nn.Linear(conv_channels * 8 * spatial, 2)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming-normal weights scaled for the ReLUs that follow, counted on the outputs
        # (fan_out); each bias drawn uniformly from ±1/sqrt(fan_out), i.e. small and centred on
        # zero. Batch norm keeps its default (weight 1, bias 0).
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    fan_out = module.weight.shape[0] * math.prod(module.weight.shape[2:])
                    bound = 1.0 / math.sqrt(fan_out)
                    nn.init.uniform_(module.bias, -bound, bound)

    def _check_input(self, x: Any) -> None:
        expected = f"(N, {self.in_channels}, {', '.join(str(s) for s in INPUT_SHAPE_IRC)})"
        if not isinstance(x, torch.Tensor):
            raise DataFormatError(f"LunaModel: input is a {type(x).__name__}; expected a tensor {expected}")
        if x.ndim != 5:
            hint = "; add the batch dimension with x.unsqueeze(0)" if x.ndim == 4 else ""
            raise DataFormatError(f"LunaModel: input has shape {tuple(x.shape)}; expected {expected}{hint}")
        if x.shape[1] != self.in_channels:
            raise DataFormatError(
                f"LunaModel: input has {x.shape[1]} channels (shape {tuple(x.shape)}); expected {expected}"
            )
        if not x.is_floating_point():
            raise DataFormatError(
                f"LunaModel: input has dtype {x.dtype}; expected a float tensor "
                "(convert int16 chunks with .float() on the device)"
            )
        features = self.conv_channels * 8 * math.prod(int(s) // _POOLING for s in x.shape[2:])
        if features != self.head_linear.in_features:
            raise DataFormatError(
                f"LunaModel: input has spatial shape {tuple(x.shape[2:])}, which gives {features} features "
                f"after four 2× poolings; the head expects {self.head_linear.in_features}; "
                f"crop chunks to {INPUT_SHAPE_IRC} (I, R, C)"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify a batch of chunks.

        x: (N, 1, 32, 48, 48) float HU (any float dtype, contiguous or channels_last_3d).
        Returns (logits, probabilities): both (N, 2), column 1 = nodule, float32 also under
            autocast (float64 for a float64 model and input); probabilities are the softmax of
            the logits over dim 1.
        """
        return self.from_features(self.features(x), len(STAGES))

    def features(self, x: torch.Tensor, stop: int = len(STAGES)) -> torch.Tensor:
        """x (checked as `forward` checks it) through the first `stop` of `STAGES` (0: x itself)."""
        self._check_input(x)
        return self._stages(x, 0, _check_stage(stop))

    def from_features(self, features: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s (logits, probabilities) from what the first `start` of `STAGES` made of the input:
        the remaining stages and the head. `from_features(features(x, k), k)` is `forward(x)` for every k."""
        x = self._stages(features, _check_stage(start), len(STAGES))
        # flatten reshapes in logical order; a .view would fail on channels_last_3d strides.
        logits = float32_head(self.head_linear, torch.flatten(x, 1))
        return logits, F.softmax(logits, dim=1)

    def _stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for name in STAGES[start:stop]:
            x = getattr(self, name)(x)
        return x

    def describe(self) -> dict[str, Any]:
        """Plain description for logs and checkpoints: architecture, sizes, parameter count, signature."""
        return {
            "arch": MODEL_ARCH,
            "in_channels": self.in_channels,
            "conv_channels": self.conv_channels,
            "input_shape": [self.in_channels, *INPUT_SHAPE_IRC],
            "trainable_parameters": count_parameters(self),
            "signature": arch_signature(self),
        }


def float32_head(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """`head(features)` in float32 (or wider) whatever autocast is on.

    Under bf16 autocast a linear layer returns bf16: 8 significant bits, so logits above 16 are
    0.125 apart and many candidates share one score, which ties the FROC ranking. The head is a
    sliver of the model's work, so it runs in float32 (autocast off, features cast up); the
    weights it was trained with are the same float32 tensors either way.
    features: (N, F) any float dtype. Returns (N, out) float32 (float64 for float64 features).
    """
    wide = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        return head(features.to(wide))


def _check_stage(stage: Any) -> int:
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= len(STAGES):
        raise ConfigError(f"LunaModel: stage {stage!r}; expected an int 0 … {len(STAGES)} (of {', '.join(STAGES)})")
    return stage


def shared_stages(first: nn.Module, second: nn.Module) -> int:
    """How many of the leading `STAGES` two `LunaModel`s compute alike: their weights and batch-norm
    statistics are equal, stage by stage from the input (a model fine-tuned from the other with
    `--finetune-depth 2` shares tail_batchnorm … block3: 4; with depth 1, all 5). The output of those
    stages is then the same for both, and can be computed once. 0 for models of other sizes or classes.
    """
    if not (isinstance(first, LunaModel) and isinstance(second, LunaModel)):
        return 0
    if (first.in_channels, first.conv_channels) != (second.in_channels, second.conv_channels):
        return 0
    count = 0
    for name in STAGES:
        mine, theirs = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        keys = [key for key in mine if not key.endswith("num_batches_tracked")]  # counts training steps only
        if set(keys) != {key for key in theirs if not key.endswith("num_batches_tracked")}:
            break
        if not all(torch.equal(mine[key], theirs[key].to(mine[key].device)) for key in keys):
            break
        count += 1
    return count


def weight_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level modules that hold weights, input to output (the book's fine-tuning units).

    For `LunaModel`: tail_batchnorm, block1, block2, block3, block4, head_linear (6 blocks).
    """
    return [(name, module) for name, module in model.named_children() if any(True for _ in module.parameters())]


def freeze_for_finetune(model: nn.Module, depth: int) -> list[str]:
    """Train only the last `depth` weight blocks (1: the head alone; the book's --finetune-depth).

    Sets `requires_grad=False` on every parameter of the other blocks and returns the names of the
    blocks that still train. Frozen blocks should also stay in eval mode while training, so their
    batch-norm statistics do not drift (`set_train_mode`). ConfigError for a depth outside 1..blocks.
    """
    blocks = weight_blocks(model)
    names = [name for name, _ in blocks]
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= len(blocks):
        raise ConfigError(
            f"--finetune-depth {depth}: {type(model).__name__} has {len(blocks)} blocks with weights "
            f"({', '.join(names)}); expected 1 (only {names[-1]} trains) to {len(blocks)} (all of them)"
        )
    trained = names[-depth:]
    for name, module in blocks:
        module.requires_grad_(name in trained)
    return trained


def set_train_mode(model: nn.Module, training: bool = True) -> None:
    """`model.train(training)`, but top-level blocks without trainable parameters stay in eval mode
    (frozen batch norm keeps its running statistics, as a frozen block should)."""
    model.train(training)
    if training:
        for _, module in weight_blocks(model):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as batch-norm running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def arch_signature(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], arch: str = MODEL_ARCH) -> str:
    """`arch` (the architecture's name and version) plus a short hash of every state-dict key and tensor shape.

    Two models whose weights can be loaded into each other have the same signature; a checkpoint
    from another architecture (other layers, other widths) does not. The `_orig_mod.` prefix of
    torch.compile and the `module.` prefix of DistributedDataParallel are ignored.
    arch: the name tag, `MODEL_ARCH` for `LunaModel`, `p2ch.unet.UNET_ARCH` for the UNet, so that
        checkpoints of different model families differ by name as well as by hash.
    Returns e.g. 'LunaModel-v1:3f2a…' (16 hex digits).
    """
    if not isinstance(arch, str) or not arch or ":" in arch:
        raise ConfigError(
            f"arch_signature: arch is {arch!r}; expected a non-empty name without ':' such as {MODEL_ARCH!r}"
        )
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise TypeError(
            f"arch_signature: got a {type(model_or_state_dict).__name__}; expected an nn.Module or a state dict"
        )
    lines = []
    for key, value in state.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
        lines.append(f"{name}:{','.join(str(s) for s in shape)}")
    digest = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()[:16]
    return f"{arch}:{digest}"


def fuse_conv_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of `model` in which every Conv → BatchNorm pair of an `nn.Sequential` is one conv.

    In eval mode a batch norm is a per-channel affine map of its running statistics, y = a·x + b,
    so a convolution right before it can absorb it: weights × a, bias → a·bias + b. The copy
    computes the same function (to float rounding) with one pass over the activations fewer per
    pair, which is what an inference on the CPU is bound by. The norm's place holds an
    `nn.Identity`, so module names stay. Pairs in another order (a norm after the ReLU) are left as
    they are: folding those into the next convolution would change what its zero padding means.
    `model` itself is not changed; the copy is in eval mode and shares no tensors with it.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for k in range(len(module) - 1):
            conv, norm = module[k], module[k + 1]
            conv_norm = (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)) or (
                isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d)
            )
            if conv_norm and norm.track_running_stats and norm.running_var is not None:
                module[k] = _folded(conv, norm)
                module[k + 1] = nn.Identity()
    return fused


@torch.no_grad()
def _folded(conv: nn.Conv2d | nn.Conv3d, norm: nn.BatchNorm2d | nn.BatchNorm3d) -> nn.Module:
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.affine:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.affine:
        shift = shift + norm.bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    folded = copy.deepcopy(conv)
    folded.weight.copy_((conv.weight.double() * scale.reshape(-1, *[1] * (conv.weight.ndim - 1))).to(conv.weight))
    folded.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
    return folded
