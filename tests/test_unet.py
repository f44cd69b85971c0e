"""The UNet: shapes, size checks, layouts, init, a tiny overfit, and its architecture signature."""

from __future__ import annotations

import pytest
import torch

from p2ch.checkpoint import load_checkpoint, save_checkpoint
from p2ch.errors import ConfigError, DataFormatError
from p2ch.model import MODEL_ARCH, LunaModel, arch_signature, fuse_conv_batchnorm
from p2ch.segmetrics import dice_loss, pixel_counts, segmentation_loss
from p2ch.unet import (
    UNET_ARCH,
    SkipSplitUpBlock,
    UNet,
    UNetWrapper,
    check_input_size,
    inference_copy,
    receptive_radius,
    unet_signature,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def hu_slices(n: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, channels, h, w), generator=g) * 300 - 500


def disks(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, size, size) HU slices of lung (-800) with one +100 HU disk each, and its (n, 1, ...) mask."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = []
    for _ in range(n):
        center = torch.randint(8, size - 8, (2,), generator=g)
        radius = 3 + 3 * torch.rand((), generator=g)
        masks.append((rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2)
    mask = torch.stack(masks)[:, None]
    image = torch.where(mask, 100.0, -800.0) + 20 * torch.randn(mask.shape, generator=g)
    return image, mask


@pytest.mark.parametrize(("depth", "wf"), [(3, 4), (3, 5), (4, 4), (4, 5)])
def test_output_has_the_input_size(depth, wf):
    model = UNetWrapper(in_channels=7, n_classes=1, depth=depth, wf=wf).eval()
    x = hu_slices(2, 7, 64, 48)
    with torch.no_grad():
        prob = model(x)
    assert prob.shape == (2, 1, 64, 48) and prob.dtype == torch.float32
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0
    widths = [block.block[0].out_channels for block in model.unet.down_path]
    assert widths == [2 ** (wf + level) for level in range(depth)]


@pytest.mark.parametrize("up_mode", ["upconv", "upsample"])
def test_up_modes_and_classes(up_mode):
    model = UNetWrapper(in_channels=3, n_classes=2, up_mode=up_mode, batch_norm=False).eval()
    uses_transpose = any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    assert uses_transpose == (up_mode == "upconv")
    with torch.no_grad():
        assert model(hu_slices(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_unpadded_unet_shrinks_as_computed():
    assert check_input_size(92, 92, 3, padding=False) == (52, 52)
    model = UNet(in_channels=1, n_classes=1, depth=3, padding=False).eval()
    with torch.no_grad():
        assert model(hu_slices(1, 1, 92, 92)).shape == (1, 1, 52, 52)
    with pytest.raises(ConfigError, match="H = 93"):
        check_input_size(93, 92, 3, padding=False)


def test_refuses_a_size_the_depth_cannot_take():
    with pytest.raises(ConfigError) as info:
        check_input_size(63, 63, 3)
    message = str(info.value)
    assert "\n" not in message
    assert "63×63" in message and "depth 3" in message and "64×64" in message
    assert check_input_size(64, 60, 3) == (64, 60)
    check_input_size(60, 60, 3)
    with pytest.raises(ConfigError, match="depth 4"):
        check_input_size(60, 60, 4)  # 60 is not a multiple of 8
    with pytest.raises(ConfigError, match="63×63"):
        UNetWrapper()(hu_slices(1, 7, 63, 63))
    with pytest.raises(ConfigError, match="63×64"):
        UNet(7, 1)(hu_slices(1, 7, 63, 64))  # the bare UNet checks too


@pytest.mark.parametrize(
    ("x", "words"),
    [
        (torch.zeros(7, 64, 64), "unsqueeze"),
        (torch.zeros(1, 3, 64, 64), "(N, 7, H, W)"),
        (torch.zeros(1, 7, 64, 64, dtype=torch.int16), "int16"),
        ([[0.0]], "list"),
    ],
)
def test_refuses_bad_input(x, words):
    with pytest.raises(DataFormatError) as info:
        UNetWrapper()(x)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"depth": 0}, "depth"),
        ({"wf": -1}, "wf"),
        ({"in_channels": 7.0}, "in_channels"),
        ({"up_mode": "nearest"}, "up_mode"),
        ({"padding": 1}, "padding"),
        ({"wf": 12, "depth": 6}, "wf"),
    ],
)
def test_refuses_bad_settings(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        UNetWrapper(**kwargs)


@pytest.mark.parametrize("up_mode", ["upconv", "upsample"])
def test_channels_last_matches_contiguous(up_mode):
    torch.manual_seed(0)
    model = UNetWrapper(up_mode=up_mode).eval()
    with torch.no_grad():
        model.input_batchnorm.running_mean.fill_(-500.0)
        model.input_batchnorm.running_var.fill_(300.0**2)
    x = hu_slices(3, 7, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_init_is_kaiming_and_biases_start_at_zero():
    torch.manual_seed(0)
    model = UNetWrapper(wf=5)
    conv = model.unet.down_path[1].block[0]  # 3×3, 32 -> 64 channels
    fan_in = conv.in_channels * 9
    assert conv.bias is None  # batch norm follows
    assert float(conv.weight.detach().std()) == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.05)
    plain = UNetWrapper(batch_norm=False)
    biases = [m.bias for m in plain.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert biases and all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def test_untrained_logits_stay_in_range_without_batch_norm():
    # He init alone (no batch norm inside to rescale) keeps the logits from exploding or vanishing.
    torch.manual_seed(0)
    model = UNetWrapper(batch_norm=False)
    with torch.no_grad():
        logits = model.unet(model.input_batchnorm(hu_slices(4, 7, 64, 64)))
    assert 0.05 < float(logits.std()) < 20


def test_autocast_gives_float32_probabilities():
    model = UNetWrapper().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        prob = model(hu_slices(2, 7, 32, 32))
    assert prob.dtype == torch.float32 and prob.shape == (2, 1, 32, 32)


def test_a_tiny_unet_overfits_four_disks():
    torch.manual_seed(0)
    image, mask = disks(4)
    model = UNetWrapper(in_channels=1, n_classes=1, depth=3, wf=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        optimizer.zero_grad()
        loss = dice_loss(model(image), mask).mean()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        tp, fn, fp = pixel_counts(model(image), mask).sum(dim=0).tolist()
    dice = 2 * tp / (2 * tp + fn + fp)
    assert dice > 0.8, (tp, fn, fp)


def test_signature_differs_from_the_classifier_and_load_refuses_it(tmp_path):
    unet = UNetWrapper()
    signature = unet_signature(unet)
    assert signature.startswith(f"{UNET_ARCH}:") and UNET_ARCH == "UNetWrapper-v1"
    assert signature == arch_signature(unet.state_dict(), UNET_ARCH) == unet.describe()["signature"]
    assert unet_signature(UNetWrapper(wf=5)) != signature
    assert unet.describe()["arch"] == UNET_ARCH and unet.describe()["depth"] == 3
    classifier = arch_signature(LunaModel())
    assert classifier.startswith(f"{MODEL_ARCH}:") and classifier.split(":")[0] != signature.split(":")[0]

    luna_path = tmp_path / "luna.pt"
    save_checkpoint({"arch": classifier, "model": LunaModel().state_dict()}, luna_path)
    with pytest.raises(ConfigError) as info:
        load_checkpoint(luna_path, arch=signature)
    assert classifier in str(info.value) and signature in str(info.value)

    unet_path = tmp_path / "unet.pt"
    save_checkpoint({"arch": signature, "model": unet.state_dict()}, unet_path)
    with pytest.raises(ConfigError, match=UNET_ARCH):
        load_checkpoint(unet_path, arch=classifier)
    restored = UNetWrapper()
    restored.load_state_dict(load_checkpoint(unet_path, arch=signature)["model"])
    assert all(
        torch.equal(a, b) for a, b in zip(restored.state_dict().values(), unet.state_dict().values(), strict=True)
    )


def test_arch_signature_refuses_a_bad_name():
    with pytest.raises(ConfigError, match="arch"):
        arch_signature(UNetWrapper(), "bad:name")


@pytest.mark.gpu
@cuda
def test_cuda_bf16_channels_last_forward_backward():
    model = UNetWrapper().cuda().to(memory_format=torch.channels_last)
    x = hu_slices(4, 7, 64, 64).cuda().contiguous(memory_format=torch.channels_last)
    mask = torch.zeros(4, 1, 64, 64, dtype=torch.bool, device="cuda")
    mask[:, :, 28:36, 28:36] = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        prob = model(x)
        loss = segmentation_loss(prob, mask).mean()
    assert prob.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_book_block_order_is_part_of_the_architecture():
    book, p2ch = UNetWrapper(3, 1, 2, 2, block_order="book"), UNetWrapper(3, 1, 2, 2)
    assert unet_signature(book).startswith("UNetWrapper-v1-book:") and unet_signature(p2ch).startswith(
        "UNetWrapper-v1:"
    )
    no_norm = [UNetWrapper(3, 1, 2, 2, batch_norm=False, block_order=order) for order in ("p2ch", "book")]
    assert no_norm[0].state_dict().keys() == no_norm[1].state_dict().keys()  # same tensors, other pooling
    assert unet_signature(no_norm[0]) != unet_signature(no_norm[1])
    assert book.describe()["block_order"] == "book" and book.describe()["arch"] == "UNetWrapper-v1-book"
    with pytest.raises(ConfigError, match="block_order is 'keras'"):
        UNetWrapper(block_order="keras")


@pytest.mark.parametrize("block_order", ["p2ch", "book"])
def test_fused_inference_copy_gives_the_same_probabilities(block_order):
    torch.manual_seed(3)
    model = UNetWrapper(in_channels=3, depth=3, wf=2, block_order=block_order)
    with torch.no_grad():  # statistics a trained model would have, so the fold has something to fold
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    model.eval()
    fused = fuse_conv_batchnorm(model)
    x = torch.randn(2, 3, 16, 24) * 300 - 400
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.unet.modules())
    # p2ch's Conv → BatchNorm pairs fold; the book's norm after the ReLU stays (its padding forbids folding)
    assert norms == (0 if block_order == "p2ch" else 10)
    assert isinstance(fused.input_batchnorm, torch.nn.BatchNorm2d)  # a norm before any convolution stays
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.unet.modules()) == 10  # the model is untouched


def _with_trained_statistics(model: UNetWrapper) -> UNetWrapper:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and module is not model.input_batchnorm:
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
        model.input_batchnorm.running_mean.fill_(-400.0)
        model.input_batchnorm.running_var.fill_(300.0**2)
    return model.eval()


@pytest.mark.parametrize(
    ("block_order", "up_mode", "batch_norm"),
    [("p2ch", "upconv", True), ("book", "upconv", True), ("p2ch", "upsample", True), ("p2ch", "upconv", False)],
)
def test_inference_copy_joins_skips_without_concatenation_and_gives_the_same_probabilities(
    block_order, up_mode, batch_norm, monkeypatch
):
    torch.manual_seed(4)
    model = UNetWrapper(in_channels=3, depth=3, wf=2, block_order=block_order, up_mode=up_mode, batch_norm=batch_norm)
    model = _with_trained_statistics(model)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    fast = inference_copy(model)
    x = torch.randn(2, 3, 16, 24) * 300 - 400
    with torch.no_grad():
        expected = model(x)
        assert 0.05 < expected.mean() < 0.95 and expected.std() > 0.01, "the test model must not saturate"
        monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("the inference copy concatenated"))
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
        channels_last = fast.to(memory_format=torch.channels_last)
        got = channels_last(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fast(x), expected, rtol=0, atol=0.03)
    assert all(isinstance(block, SkipSplitUpBlock) for block in fast.unet.up_path)
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items()), "model untouched"
    kept = inference_copy(model, split_skips=False)
    assert not any(isinstance(block, SkipSplitUpBlock) for block in kept.unet.up_path)


def test_inference_copy_of_an_unpadded_unet_crops_the_skips_as_the_model_does():
    torch.manual_seed(5)
    model = _with_trained_statistics(UNetWrapper(in_channels=1, depth=3, wf=2, padding=False))
    x = torch.randn(1, 1, 60, 68) * 300 - 400
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(inference_copy(model)(x), expected, rtol=1e-4, atol=1e-5)
    assert expected.shape[2:] == (20, 28)


def test_inference_copy_refuses_what_is_not_a_unet():
    with pytest.raises(ConfigError, match="expected a UNetWrapper, got a LunaModel"):
        inference_copy(LunaModel())


@pytest.mark.parametrize("up_mode", ["upconv", "upsample"])
def test_receptive_radius_is_the_reach_autograd_measures(up_mode):
    """The exact reach: the farthest input pixel with a gradient, over every position on the pooling grid."""
    torch.manual_seed(6)
    for depth in (1, 2, 3, 4):
        model = UNetWrapper(in_channels=1, depth=depth, wf=1, block_order="book", up_mode=up_mode).eval()
        with torch.no_grad():  # positive weights and inputs: no ReLU is dead, no terms cancel
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    module.weight.abs_()
                    module.bias.fill_(0.1)
        reach = 0
        for pixel in range(64, 64 + 2 ** (depth - 1)):
            x = (torch.rand(1, 1, 128, 128) + 0.1).requires_grad_(True)
            model.unet(x)[0, 0, pixel, pixel].backward()
            rows, cols = (torch.nonzero(x.grad[0, 0].abs().amax(dim=axis) > 0).flatten() for axis in (1, 0))
            reach = max(reach, pixel - int(rows[0]), int(rows[-1]) - pixel, pixel - int(cols[0]), int(cols[-1]) - pixel)
        assert receptive_radius(depth, up_mode) == reach, (depth, up_mode)
    assert receptive_radius(3) == 23  # the book's UNet; summing each step's worst case said 29
    with pytest.raises(ConfigError, match="up_mode"):
        receptive_radius(3, "nearest")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="depth"):
            receptive_radius(bad)
