"""LunaModel: size, outputs, names, init, bad input, autocast and channels_last_3d."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from p2ch.errors import ConfigError, DataFormatError
from p2ch.model import (
    MODEL_ARCH,
    STAGES,
    LunaModel,
    arch_signature,
    count_parameters,
    float32_head,
    freeze_for_finetune,
    set_train_mode,
    shared_stages,
)
from p2ch.unet import UNetWrapper


def make_input(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1, 32, 48, 48), generator=g)


def seeded_model(seed: int = 0, **kwargs) -> LunaModel:
    torch.manual_seed(seed)
    return LunaModel(**kwargs)


def test_parameter_count_is_the_books():
    model = LunaModel()
    assert count_parameters(model) == 222_220
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 222_220
    assert model.head_linear.in_features == 1152
    assert model.describe()["trainable_parameters"] == 222_220


def test_parameter_count_follows_conv_channels():
    # 4 channels: blocks 4 -> 8 -> 16 -> 32, head 32 * 18 = 576 features
    model = LunaModel(conv_channels=4)
    blocks = [(1, 4), (4, 8), (8, 16), (16, 32)]
    expected = 2 + sum(a * b * 27 + b + b * b * 27 + b for a, b in blocks) + 576 * 2 + 2
    assert count_parameters(model) == expected
    assert model.head_linear.in_features == 576


def test_block_and_state_dict_names_are_stable():
    model = LunaModel()
    names = [name for name, _ in model.named_children()]
    assert names == ["tail_batchnorm", "block1", "block2", "block3", "block4", "head_linear"]
    expected = [
        "tail_batchnorm.weight",
        "tail_batchnorm.bias",
        "tail_batchnorm.running_mean",
        "tail_batchnorm.running_var",
        "tail_batchnorm.num_batches_tracked",
    ]
    for k in range(1, 5):
        expected += [f"block{k}.conv1.weight", f"block{k}.conv1.bias", f"block{k}.conv2.weight", f"block{k}.conv2.bias"]
    expected += ["head_linear.weight", "head_linear.bias"]
    assert list(model.state_dict()) == expected
    assert tuple(model.block4.conv2.weight.shape) == (64, 64, 3, 3, 3)
    assert tuple(model.head_linear.weight.shape) == (2, 1152)


def test_outputs_shapes_and_probabilities():
    model = seeded_model().eval()
    x = make_input(3)
    with torch.no_grad():
        logits, prob = model(x)
    assert logits.shape == (3, 2) and prob.shape == (3, 2)
    assert prob.dtype == torch.float32
    torch.testing.assert_close(prob.sum(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(prob, torch.softmax(logits, dim=1))
    assert torch.all(prob >= 0)


def test_train_mode_backward_reaches_every_parameter():
    model = seeded_model().train()
    logits, _ = model(make_input(2) * 300 - 500)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.tail_batchnorm.num_batches_tracked.item() == 1


def test_init_is_deterministic_with_a_seed():
    a, b, c = seeded_model(7), seeded_model(7), seeded_model(8)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if name.endswith("conv1.weight"):
            assert not torch.equal(pa, pc), name


def test_init_is_kaiming_fan_out_with_small_uniform_biases():
    model = seeded_model(3)
    conv = model.block4.conv1  # 32 -> 64 channels: fan_in 864, fan_out 1728 tell the modes apart
    fan_out = 64 * 27
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.03)
    assert abs(conv.weight.mean().item()) < 0.002
    bound = 1 / math.sqrt(fan_out)
    assert conv.bias.abs().max().item() <= bound
    assert conv.bias.abs().max().item() > bound / 2  # really drawn, not zero
    linear = model.head_linear  # fan_out = 2
    assert linear.bias.abs().max().item() <= 1 / math.sqrt(2)
    assert torch.equal(model.tail_batchnorm.weight, torch.ones(1))
    assert torch.equal(model.tail_batchnorm.bias, torch.zeros(1))


@pytest.mark.parametrize(
    ("shape", "dtype", "words"),
    [
        ((1, 32, 48, 48), torch.float32, "unsqueeze(0)"),
        ((2, 2, 32, 48, 48), torch.float32, "2 channels"),
        ((2, 1, 32, 48, 40), torch.float32, "768 features"),
        ((2, 1, 16, 48, 48), torch.float32, "(32, 48, 48)"),
        ((2, 1, 32, 48, 48), torch.int16, ".float()"),
    ],
)
def test_bad_input_gives_a_clear_error(shape, dtype, words):
    model = LunaModel()
    with pytest.raises(DataFormatError) as info:
        model(torch.zeros(shape, dtype=dtype))
    message = str(info.value)
    assert words in message
    assert "LunaModel" in message


def test_bad_constructor_arguments():
    with pytest.raises(ConfigError, match="conv_channels"):
        LunaModel(conv_channels=0)


def test_bfloat16_autocast_matches_float32():
    model = seeded_model(1).eval()
    x = make_input(2, seed=1)
    with torch.no_grad():
        ref_logits, ref_prob = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, prob = model(x)
    assert logits.dtype == torch.float32  # the head runs in float32 (see the test below)
    assert prob.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(prob).all()
    scale = ref_logits.abs().max().item()
    assert (logits.float() - ref_logits).abs().max().item() <= 0.05 * scale
    assert (prob - ref_prob).abs().max().item() < 0.05


def test_head_runs_in_float32_under_bfloat16_autocast():
    """bf16 logits are 0.125 apart above 16, which ties candidates in the FROC ranking; the head is float32."""
    model = seeded_model(3).eval()
    x = make_input(4, seed=3)
    features = {}
    model.block4.register_forward_hook(lambda module, args, out: features.setdefault("x", out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, prob = model(x)
    assert logits.dtype == torch.float32 and prob.dtype == torch.float32
    with torch.no_grad():
        expected = model.head_linear(torch.flatten(features["x"], 1).float())
    assert torch.equal(logits, expected)
    torch.testing.assert_close(prob, torch.softmax(expected, dim=1))


def test_float32_head_keeps_logits_that_bf16_would_tie():
    """Two logits 0.01 apart near 20 stay apart (bf16 would round both to 20.0)."""
    head = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        head.weight.fill_(1.0)
    features = torch.tensor([[20.0], [20.01]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tied = head(features)
        kept = float32_head(head, features)
    assert tied[0] == tied[1]  # what the head gave before
    assert kept.dtype == torch.float32 and kept[1] > kept[0]


def test_unet_logits_and_probabilities_are_float32_under_autocast():
    torch.manual_seed(0)
    wrapper = UNetWrapper(in_channels=3, n_classes=1, depth=2, wf=2).eval()
    x = torch.randn(2, 3, 16, 16) * 300
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = wrapper.unet(wrapper.input_batchnorm(x))
        prob = wrapper(x)
    assert logits.dtype == torch.float32 and prob.dtype == torch.float32
    torch.testing.assert_close(prob, torch.sigmoid(logits))


def test_float16_autocast_runs_and_is_finite():
    model = seeded_model(1).eval()
    x = make_input(2, seed=1)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            logits, prob = model(x)
    except RuntimeError as exc:  # pragma: no cover - older CPU builds lack fp16 autocast
        pytest.skip(f"float16 autocast unsupported on this CPU build: {exc}")
    with torch.no_grad():
        ref_logits, _ = model(x)
    assert torch.isfinite(logits).all() and torch.isfinite(prob).all()
    assert (logits.float() - ref_logits).abs().max().item() <= 0.02 * ref_logits.abs().max().item()


def test_channels_last_3d_matches_contiguous():
    model = seeded_model(2).eval()
    x = make_input(2, seed=2)
    last = seeded_model(2).eval().to(memory_format=torch.channels_last_3d)
    assert last.block2.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not last.block2.conv1.weight.is_contiguous()
    with torch.no_grad():
        ref_logits, ref_prob = model(x)
        logits, prob = last(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prob, ref_prob, rtol=1e-4, atol=1e-5)


def test_arch_signature_tells_architectures_apart():
    model = LunaModel()
    signature = arch_signature(model)
    assert signature.startswith(f"{MODEL_ARCH}:")
    assert arch_signature(LunaModel()) == signature  # weights do not matter, shapes do
    assert arch_signature(model.state_dict()) == signature
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert arch_signature(wrapped) == signature
    assert arch_signature(LunaModel(conv_channels=16)) != signature
    state = dict(model.state_dict())
    state.pop("head_linear.bias")
    assert arch_signature(state) != signature
    assert model.describe()["signature"] == signature
    assert model.describe()["arch"] == MODEL_ARCH == "LunaModel-v1"


def test_state_dict_round_trip_gives_identical_outputs():
    a, b = seeded_model(4).eval(), seeded_model(5).eval()
    x = make_input(1, seed=4)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])


# ---------------------------------------------------------------------------------------------
# stages: the part of the model before the head, and what two models share of it


def _random_stats(model: LunaModel, seed: int) -> LunaModel:
    """`model` in eval mode with input statistics for raw HU, so the stages see varied values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.tail_batchnorm.running_mean.fill_(-400.0)
        model.tail_batchnorm.running_var.fill_(300.0**2)
    return model.eval()


def test_features_then_from_features_is_forward_at_every_stage():
    model = _random_stats(LunaModel(conv_channels=4), 0)
    x = torch.randn(3, 1, 32, 48, 48) * 300 - 400
    logits, prob = model(x)
    for k in range(len(STAGES) + 1):
        features = model.features(x, k)
        got_logits, got_prob = model.from_features(features, k)
        torch.testing.assert_close(got_logits, logits)
        torch.testing.assert_close(got_prob, prob)
    assert model.features(x, 0) is x
    assert model.features(x, 4).shape == (3, 16, 4, 6, 6)  # block3's output for width 4
    with pytest.raises(DataFormatError, match="crop chunks to"):
        model.features(torch.zeros(3, 1, 32, 48, 40), 2)
    for bad in (-1, 6, 2.0, True):
        with pytest.raises(ConfigError, match="stage"):
            model.features(x, bad)


def _finetuned(source: LunaModel, depth: int, seed: int) -> LunaModel:
    """A copy of `source` fine-tuned as `training --finetune --finetune-depth depth` does: the last `depth`
    blocks change (a few optimizer steps), the frozen ones stay in eval mode and keep their statistics."""
    model = copy.deepcopy(source)
    freeze_for_finetune(model, depth)
    set_train_mode(model, True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(seed)
    for _ in range(2):
        x = torch.randn(4, 1, 32, 48, 48) * 300 - 400
        logits, _ = model(x)
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_shared_stages_counts_what_fine_tuning_left_alone():
    nodule = _random_stats(LunaModel(conv_channels=4), 1)
    assert shared_stages(nodule, copy.deepcopy(nodule)) == len(STAGES)
    assert shared_stages(nodule, _finetuned(nodule, 2, 2)) == 4  # tail_batchnorm … block3
    assert shared_stages(nodule, _finetuned(nodule, 1, 3)) == 5  # all but the head
    assert shared_stages(nodule, _finetuned(nodule, 6, 4)) == 0  # everything trained, the input norm too
    other = _random_stats(LunaModel(conv_channels=4), 5)
    assert shared_stages(nodule, other) == 1  # only the input norm's statistics are alike
    assert shared_stages(nodule, LunaModel(conv_channels=8)) == 0
    assert shared_stages(nodule, UNetWrapper()) == 0
    moved = copy.deepcopy(nodule).to(memory_format=torch.channels_last_3d)
    assert shared_stages(nodule, moved) == len(STAGES), "equal weights in another memory format are shared"


def test_a_fine_tuned_model_scores_from_the_shared_features():
    nodule = _random_stats(LunaModel(conv_channels=4), 6)
    malignancy = _finetuned(nodule, 2, 7)
    x = torch.randn(5, 1, 32, 48, 48) * 300 - 400
    with torch.no_grad():
        shared = nodule.features(x, 4)
        _, expected = malignancy(x)
        _, got = malignancy.from_features(shared, 4)
        _, nodule_prob = nodule(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, nodule_prob), "the fine-tuned head is its own"
