"""Batched augmentation: per-sample matrices, exact flips, offsets that move, noise, dtypes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from p2ch.augment import (
    BOOK_NOISE_HU,
    BOOK_OFFSET_2D,
    Augment2dConfig,
    AugmentConfig,
    affine_grid,
    apply_affine,
    augment_2d,
    augment_batch,
    flip_batch,
    random_affine,
    random_affine_2d,
    random_crop_2d,
)
from p2ch.errors import ConfigError, DataFormatError

SHAPE_IRC = (32, 48, 48)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def ball(n: int, radius: float, *, center_irc=None, shape_irc=SHAPE_IRC) -> torch.Tensor:
    """(n, 1, I, R, C) float64: 1 inside a ball (one-voxel linear edge), 0 outside."""
    if center_irc is None:  # the volume's centre, which is normalised (0, 0, 0)
        center_irc = [(s - 1) / 2 for s in shape_irc]
    axes = [torch.arange(s, dtype=torch.float64) - c for s, c in zip(shape_irc, center_irc, strict=True)]
    i, r, c = torch.meshgrid(*axes, indexing="ij")
    distance = torch.sqrt(i**2 + r**2 + c**2)
    one = (radius + 0.5 - distance).clamp(0, 1)
    return one.expand(n, 1, *shape_irc).contiguous()


def center_of_mass_irc(volume: torch.Tensor) -> torch.Tensor:
    """(N, 1, I, R, C) -> (N, 3) centre of mass in voxel (index, row, col)."""
    v = volume.double()[:, 0]
    total = v.sum(dim=(1, 2, 3))
    out = []
    for dim, size in zip((1, 2, 3), v.shape[1:], strict=True):
        coords = torch.arange(size, dtype=torch.float64).view([-1 if d == dim else 1 for d in range(4)])
        out.append((v * coords).sum(dim=(1, 2, 3)) / total)
    return torch.stack(out, dim=1)


# -- config -----------------------------------------------------------------------------------


def test_config_presets_and_flags():
    assert not AugmentConfig.none().enabled
    assert AugmentConfig.none() == AugmentConfig()
    book = AugmentConfig.book()
    assert book == AugmentConfig(flip=True, offset=0.1, scale=0.2, rotate=True, noise=25.0)
    assert book.enabled and book.resamples
    assert AugmentConfig.from_flags(augmented=True) == book
    assert AugmentConfig.from_flags() == AugmentConfig.none()
    assert AugmentConfig.from_flags(flip=True) == AugmentConfig(flip=True)
    assert AugmentConfig.from_flags(offset=True) == AugmentConfig(offset=0.1)
    assert AugmentConfig.from_flags(scale=True) == AugmentConfig(scale=0.2)
    assert AugmentConfig.from_flags(rotate=True) == AugmentConfig(rotate=True)
    assert AugmentConfig.from_flags(noise=True) == AugmentConfig(noise=BOOK_NOISE_HU)
    assert AugmentConfig.from_flags(flip=True, noise=True).resamples is False
    assert AugmentConfig(flip=True).enabled and not AugmentConfig(flip=True).resamples
    assert book.to_dict() == {"flip": True, "offset": 0.1, "scale": 0.2, "rotate": True, "noise": 25.0}


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"noise": -1.0}, "noise"),
        ({"noise": math.inf}, "noise"),
        ({"scale": 1.0}, "scale"),
        ({"offset": math.nan}, "offset"),
        ({"offset": "0.1"}, "offset"),
        ({"flip": "yes"}, "flip"),
    ],
)
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        AugmentConfig(**kwargs)


# -- matrices ---------------------------------------------------------------------------------


def test_each_sample_gets_its_own_matrix():
    theta = random_affine(16, AugmentConfig.book(), generator=gen(0))
    assert theta.shape == (16, 3, 4) and theta.dtype == torch.float32
    flat = theta.reshape(16, -1)
    for a, b in itertools.combinations(range(16), 2):
        assert not torch.allclose(flat[a], flat[b]), (a, b)
    assert len(set(theta[:, :, 3].reshape(-1).tolist())) == 48  # every offset drawn anew


def test_disabled_matrix_is_identity():
    theta = random_affine(5, AugmentConfig.none(), generator=gen(0))
    assert torch.equal(theta, torch.eye(3, 4).expand(5, 3, 4))


def test_matrix_ranges_match_the_config():
    n = 2000
    offset = random_affine(n, AugmentConfig(offset=0.1), generator=gen(1), dtype=torch.float64)
    t = offset[:, :, 3]
    assert t.abs().max().item() <= 0.1 and t.abs().max().item() > 0.099
    assert torch.equal(offset[:, :, :3], torch.eye(3, dtype=torch.float64).expand(n, 3, 3))
    scale = random_affine(n, AugmentConfig(scale=0.2), generator=gen(2), dtype=torch.float64)
    s = torch.diagonal(scale[:, :, :3], dim1=1, dim2=2)
    assert s.min().item() >= 0.8 and s.max().item() <= 1.2
    assert s.min().item() < 0.81 and s.max().item() > 1.19
    off_diagonal = scale[:, :, :3] - torch.diag_embed(s)
    assert torch.count_nonzero(off_diagonal) == 0 and torch.count_nonzero(scale[:, :, 3]) == 0


def test_rotation_is_about_the_index_axis_and_covers_all_angles():
    theta = random_affine(1000, AugmentConfig(rotate=True), generator=gen(3), dtype=torch.float64)
    # index (z) row and column untouched, no translation
    assert torch.equal(theta[:, 2], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64).expand(1000, 4))
    assert torch.count_nonzero(theta[:, :2, 2]) == 0 and torch.count_nonzero(theta[:, :, 3]) == 0
    block = theta[:, :2, :2]
    eye = torch.eye(2, dtype=torch.float64).expand(1000, 2, 2)
    torch.testing.assert_close(block @ block.transpose(1, 2), eye)
    torch.testing.assert_close(torch.det(block), torch.ones(1000, dtype=torch.float64))  # no reflection
    angle = torch.atan2(block[:, 1, 0], block[:, 0, 0]) % (2 * math.pi)
    counts = torch.histc(angle, bins=4, min=0, max=2 * math.pi)
    assert counts.min().item() > 200  # all four quadrants, about 250 each


def test_rotation_is_rigid_in_voxels_on_a_non_square_plane():
    shape_irc = (8, 40, 48)
    theta = random_affine(50, AugmentConfig(rotate=True), generator=gen(4), dtype=torch.float64, shape_irc=shape_irc)
    half = torch.diag(torch.tensor([48 / 2, 40 / 2, 8 / 2], dtype=torch.float64))  # (x, y, z) half-extents
    voxel = half @ theta[:, :, :3] @ torch.linalg.inv(half)
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    torch.testing.assert_close(voxel @ voxel.transpose(1, 2), eye)
    assert not torch.allclose(theta[:, 0, 1].abs(), theta[:, 1, 0].abs())  # normalised units do differ


def test_switching_noise_on_does_not_change_the_matrices():
    a = random_affine(8, AugmentConfig(offset=0.1, rotate=True), generator=gen(5))
    b = random_affine(8, AugmentConfig(offset=0.1, rotate=True, noise=25.0), generator=gen(5))
    assert torch.equal(a, b)


# -- augment_batch: identity, flips -------------------------------------------------------------


def test_disabled_returns_the_input_exactly():
    x = torch.randn(3, 1, 6, 7, 8, generator=gen(0)) * 400
    out = augment_batch(x, AugmentConfig.none(), generator=gen(1))
    assert out is x
    chunks = (x.round().clamp(-1000, 1000)).to(torch.int16)
    out16 = augment_batch(chunks, AugmentConfig.none(), generator=gen(1))
    assert out16.dtype == torch.float32 and torch.equal(out16, chunks.float())


def test_flips_are_exact_per_axis_and_about_half():
    n = 400
    pattern = torch.randperm(3 * 4 * 5, generator=gen(0)).float().reshape(1, 1, 3, 4, 5)
    x = pattern.expand(n, 1, 3, 4, 5).contiguous()
    out = augment_batch(x, AugmentConfig(flip=True), generator=gen(11))
    theta = random_affine(n, AugmentConfig(flip=True), generator=gen(11))
    expected_flips = torch.diagonal(theta[:, :, :3], dim1=1, dim2=2) < 0  # (x, y, z) = (col, row, index)

    combos = {}
    for flags in itertools.product((False, True), repeat=3):  # (col, row, index)
        dims = tuple(dim for dim, on in zip((4, 3, 2), flags, strict=True) if on)
        combos[flags] = torch.flip(pattern, dims=dims) if dims else pattern
    found = torch.zeros(n, 3, dtype=torch.bool)
    seen = dict.fromkeys(combos, 0)
    for k in range(n):
        matches = [flags for flags, ref in combos.items() if torch.equal(out[k : k + 1], ref)]
        assert len(matches) == 1, f"sample {k} is not an exact flip of the input"
        found[k] = torch.tensor(matches[0])
        seen[matches[0]] += 1
    assert torch.equal(found, expected_flips)
    per_axis = found.sum(dim=0)
    assert torch.all((per_axis > 150) & (per_axis < 250)), per_axis  # 200 ± 5σ
    assert min(seen.values()) >= 20, seen  # all eight combinations: axes flip independently


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_grid_equals_torch_affine_grid(dtype):
    theta = random_affine(5, AugmentConfig.book(), generator=gen(6), dtype=dtype)
    shape = (5, 1, 6, 10, 14)
    ours = affine_grid(theta, shape)
    reference = torch.nn.functional.affine_grid(theta, list(shape), align_corners=False)
    assert ours.shape == reference.shape == (5, 6, 10, 14, 3) and ours.dtype == dtype
    torch.testing.assert_close(ours, reference, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)


def test_flip_batch_keeps_channels_together():
    x = torch.randn(3, 2, 4, 5, 6, generator=gen(7))
    flips = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    out = flip_batch(x, flips)
    assert out.is_contiguous()
    assert torch.equal(out[0], torch.flip(x[0], dims=(1, 3)))
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2], torch.flip(x[2], dims=(2,)))


def test_flip_batch_matches_torch_flip_on_distinct_samples():
    x = torch.randn(4, 1, 5, 6, 7, generator=gen(2))
    flips = torch.tensor([[True, False, False], [False, True, False], [False, False, True], [True, True, True]])
    out = flip_batch(x, flips)
    assert torch.equal(out[0], torch.flip(x[0], dims=(3,)))  # col: last axis of a sample
    assert torch.equal(out[1], torch.flip(x[1], dims=(2,)))  # row
    assert torch.equal(out[2], torch.flip(x[2], dims=(1,)))  # index
    assert torch.equal(out[3], torch.flip(x[3], dims=(1, 2, 3)))


def test_grid_flip_agrees_with_exact_flip():
    x = torch.randn(6, 1, 5, 6, 7, generator=gen(3)) * 300
    theta = random_affine(6, AugmentConfig(flip=True), generator=gen(4))
    flips = torch.diagonal(theta[:, :, :3], dim1=1, dim2=2) < 0
    torch.testing.assert_close(apply_affine(x, theta), flip_batch(x, flips), atol=1e-3, rtol=0)


# -- augment_batch: geometry --------------------------------------------------------------------


def test_identity_matrix_resamples_to_the_input():
    x = torch.randn(2, 1, 6, 7, 8, generator=gen(0)) * 300
    torch.testing.assert_close(apply_affine(x, torch.eye(3, 4).expand(2, 3, 4)), x, atol=1e-3, rtol=0)


def test_offset_moves_the_content_by_the_expected_voxels():
    n = 8
    config = AugmentConfig(offset=0.1)
    x = ball(n, 4.0).float()
    out = augment_batch(x, config, generator=gen(21))
    theta = random_affine(n, config, generator=gen(21), dtype=torch.float64)
    t_xyz = theta[:, :, 3]
    # content moves by -t, in voxels t * size / 2; (x, y, z) -> (col, row, index)
    expected = -t_xyz.flip(1) * torch.tensor([s / 2 for s in SHAPE_IRC], dtype=torch.float64)
    shift = center_of_mass_irc(out) - center_of_mass_irc(x)
    torch.testing.assert_close(shift, expected, atol=0.02, rtol=0)
    assert shift.abs().max().item() > 1.0  # it really moved
    torch.testing.assert_close(out.sum(dim=(1, 2, 3, 4)), x.sum(dim=(1, 2, 3, 4)), rtol=1e-4, atol=0)


def test_scale_keeps_a_centred_ball_centred_and_changes_its_volume():
    n = 8
    config = AugmentConfig(scale=0.2)
    x = ball(n, 6.0).float()
    out = augment_batch(x, config, generator=gen(31))
    theta = random_affine(n, config, generator=gen(31), dtype=torch.float64)
    factors = torch.diagonal(theta[:, :, :3], dim1=1, dim2=2).prod(dim=1)
    center = torch.tensor([(s - 1) / 2 for s in SHAPE_IRC], dtype=torch.float64).expand(n, 3)
    torch.testing.assert_close(center_of_mass_irc(out), center, atol=0.01, rtol=0)
    ratio = out.double().sum(dim=(1, 2, 3, 4)) / x.double().sum(dim=(1, 2, 3, 4))
    torch.testing.assert_close(ratio, 1 / factors, rtol=0.02, atol=0)  # sampling at s·p magnifies by 1/s
    assert (ratio - 1).abs().max().item() > 0.1


def test_rotation_keeps_a_centred_ball_and_its_volume():
    n = 8
    x = ball(n, 6.0).float()
    out = augment_batch(x, AugmentConfig(rotate=True), generator=gen(41))
    center = torch.tensor([(s - 1) / 2 for s in SHAPE_IRC], dtype=torch.float64).expand(n, 3)
    torch.testing.assert_close(center_of_mass_irc(out), center, atol=0.01, rtol=0)
    torch.testing.assert_close(out.sum(dim=(1, 2, 3, 4)), x.sum(dim=(1, 2, 3, 4)), rtol=0.01, atol=0)


def test_rotation_moves_an_off_axis_ball_within_its_slice_only():
    n = 8
    center_irc = (15.5, 23.5, 33.5)  # 10 voxels right of the index axis
    x = ball(n, 3.0, center_irc=center_irc).float()
    out = augment_batch(x, AugmentConfig(rotate=True), generator=gen(42))
    com = center_of_mass_irc(out)
    torch.testing.assert_close(com[:, 0], torch.full((n,), 15.5, dtype=torch.float64), atol=0.01, rtol=0)
    radius = torch.hypot(com[:, 1] - 23.5, com[:, 2] - 23.5)
    torch.testing.assert_close(radius, torch.full((n,), 10.0, dtype=torch.float64), atol=0.05, rtol=0)
    assert (com[:, 1] - 23.5).abs().max().item() > 3  # it went round, not only stayed put


def test_rotation_leaves_an_index_only_pattern_alone():
    ramp = torch.linspace(-1000, 1000, 32).view(1, 1, 32, 1, 1).expand(4, 1, 32, 48, 48).contiguous()
    out = augment_batch(ramp, AugmentConfig(rotate=True), generator=gen(43))
    torch.testing.assert_close(out, ramp, atol=1e-2, rtol=0)


def test_quarter_turn_maps_rows_and_cols_as_documented():
    x = torch.randn(1, 1, 3, 8, 8, generator=gen(44))
    theta = torch.tensor([[[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    out = apply_affine(x, theta)
    # output (x, y) shows input (-y, x): out[i, r, c] = in[i, c, 7 - r]
    expected = x[0, 0].flip(2).transpose(1, 2).unsqueeze(0).unsqueeze(0)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


# -- noise, reproducibility, dtypes -------------------------------------------------------------


def test_noise_has_the_requested_sigma_and_zero_mean():
    x = torch.full((4, 1, *SHAPE_IRC), -500.0)
    before = x.clone()
    out = augment_batch(x, AugmentConfig(noise=25.0), generator=gen(51))
    assert torch.equal(x, before)  # input untouched
    diff = (out - x).double()
    assert diff.std().item() == pytest.approx(25.0, rel=0.01)
    assert abs(diff.mean().item()) < 0.25  # 5σ of the mean of 295k draws is 0.23 HU


def test_same_seed_same_result_other_seed_differs():
    x = ball(3, 5.0).float() * 1000 - 800
    a = augment_batch(x, AugmentConfig.book(), generator=gen(61))
    b = augment_batch(x, AugmentConfig.book(), generator=gen(61))
    c = augment_batch(x, AugmentConfig.book(), generator=gen(62))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1.0)


def test_identical_samples_come_out_different():
    x = ball(4, 5.0).float() * 1000 - 800
    out = augment_batch(x, AugmentConfig(offset=0.1, scale=0.2, rotate=True), generator=gen(63))
    for a, b in itertools.combinations(range(4), 2):
        assert (out[a] - out[b]).abs().max().item() > 10, (a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_shape_dtype_and_device_are_kept(dtype):
    x = (torch.randn(2, 1, 8, 12, 12, generator=gen(0)) * 300).to(dtype)
    for config in (AugmentConfig.book(), AugmentConfig(flip=True), AugmentConfig(noise=25.0)):
        out = augment_batch(x, config, generator=gen(1))
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert torch.isfinite(out).all()


def test_int16_chunks_become_float32():
    chunks = torch.randint(-1000, 1000, (2, 1, 8, 12, 12), dtype=torch.int16, generator=gen(0))
    out = augment_batch(chunks, AugmentConfig.book(), generator=gen(1))
    assert out.dtype == torch.float32 and out.shape == chunks.shape
    torch.testing.assert_close(out, augment_batch(chunks.float(), AugmentConfig.book(), generator=gen(1)))


def test_half_precision_is_resampled_accurately():
    x = ball(2, 6.0).float() * 1000 - 500
    ref = augment_batch(x, AugmentConfig.book(), generator=gen(71))
    half = augment_batch(x.bfloat16(), AugmentConfig.book(), generator=gen(71))
    # only the bfloat16 rounding of input and output (8 HU at 1000 HU), no grid rounding
    assert (half.float() - ref).abs().max().item() <= 8.0


def test_channels_last_3d_is_kept():
    x = torch.randn(2, 2, 8, 12, 12, generator=gen(0)).contiguous(memory_format=torch.channels_last_3d)
    for config in (AugmentConfig.book(), AugmentConfig(flip=True), AugmentConfig(noise=5.0)):
        out = augment_batch(x, config, generator=gen(1))
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
        reference = augment_batch(x.contiguous(), config, generator=gen(1))
        torch.testing.assert_close(out, reference)


def test_empty_batch_passes_through():
    x = torch.zeros(0, 1, 8, 12, 12)
    assert augment_batch(x, AugmentConfig.book(), generator=gen(0)).shape == x.shape


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "words"),
    [
        (torch.zeros(1, 32, 48, 48), "unsqueeze(0)"),
        (torch.zeros(32, 48, 48), "5 dimensions"),
        (torch.zeros(1, 1, 8, 8, 8, dtype=torch.int32), "torch.int32"),
        (torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool), "torch.bool"),
        ([[0.0]], "list"),
    ],
)
def test_bad_batch_gives_a_clear_error(batch, words):
    with pytest.raises(DataFormatError) as info:
        augment_batch(batch, AugmentConfig.book(), generator=gen(0))
    assert words in str(info.value) and "augment_batch" in str(info.value)


def test_bad_arguments_give_clear_errors():
    x = torch.zeros(2, 1, 8, 8, 8)
    with pytest.raises(ConfigError, match="AugmentConfig"):
        augment_batch(x, {"flip": True}, generator=gen(0))
    with pytest.raises(ConfigError, match=r"torch\.Generator"):
        augment_batch(x, AugmentConfig.book(), generator=None)
    with pytest.raises(DataFormatError, match="one per sample"):
        apply_affine(x, torch.eye(3, 4).expand(3, 3, 4))
    with pytest.raises(DataFormatError, match=r"\(N, 3, 4\)"):
        apply_affine(x, torch.eye(3, 3).expand(2, 3, 3))
    with pytest.raises(DataFormatError, match="bool"):
        flip_batch(x, torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="n is"):
        random_affine(-1, AugmentConfig.book(), generator=gen(0))


# -- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
def test_cuda_resampling_matches_cpu_for_the_same_matrices():
    x = ball(6, 6.0).float() * 1000 - 500
    theta = random_affine(6, AugmentConfig.book(), generator=gen(81))
    on_cpu = apply_affine(x, theta)
    on_gpu = apply_affine(x.cuda(), theta.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=0.05, rtol=0)
    flips = torch.diagonal(random_affine(6, AugmentConfig(flip=True), generator=gen(82))[:, :, :3], dim1=1, dim2=2) < 0
    assert torch.equal(flip_batch(x.cuda(), flips.cuda()).cpu(), flip_batch(x, flips))


@pytest.mark.gpu
@cuda
def test_cuda_augment_is_reproducible_and_stays_on_the_device():
    x = (ball(4, 6.0).float() * 1000 - 500).cuda()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = augment_batch(x.to(dtype), AugmentConfig.book(), generator=gen(91, "cuda"))
        b = augment_batch(x.to(dtype), AugmentConfig.book(), generator=gen(91, "cuda"))
        assert a.device == x.device and a.dtype == dtype and a.shape == x.shape
        assert torch.equal(a, b)
    noise = (
        augment_batch(
            torch.full((4, 1, *SHAPE_IRC), -500.0, device="cuda"), AugmentConfig(noise=25.0), generator=gen(92, "cuda")
        )
        + 500
    )
    assert noise.double().std().item() == pytest.approx(25.0, rel=0.01)
    with pytest.raises(ConfigError, match="generator is on cpu"):
        augment_batch(x, AugmentConfig.book(), generator=gen(0))


# -- 2D: slices and masks ---------------------------------------------------------------------


def squares(n: int, size: int = 48, channels: int = 3, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, channels, size, size) HU: -800 with a +200 HU square off-centre; its (n, 1, size, size) bool mask."""
    mask = torch.zeros((n, 1, size, size), dtype=torch.bool)
    mask[:, :, size // 4 : size // 2, size // 2 : size // 2 + 10] = True
    image = torch.where(mask, 200.0, -800.0).to(dtype).expand(n, channels, size, size).contiguous()
    return image, mask


def test_2d_config_presets_flags_and_errors():
    assert not Augment2dConfig.none().enabled
    book = Augment2dConfig.book()
    assert book == Augment2dConfig(flip=True, offset=0.03, scale=0.2, rotate=True, noise=25.0)
    assert BOOK_OFFSET_2D == 0.03 and book.enabled and book.resamples
    assert Augment2dConfig.from_flags(augmented=True) == book
    assert Augment2dConfig.from_flags(offset=True) == Augment2dConfig(offset=0.03)
    assert Augment2dConfig.from_flags(flip=True, noise=True) == Augment2dConfig(flip=True, noise=25.0)
    assert not Augment2dConfig(flip=True, noise=1.0).resamples
    assert book.to_dict() == {"flip": True, "offset": 0.03, "scale": 0.2, "rotate": True, "noise": 25.0}
    with pytest.raises(ConfigError, match=r"Augment2dConfig\.scale"):
        Augment2dConfig(scale=1.0)
    with pytest.raises(ConfigError, match=r"AugmentConfig\.scale"):  # the 3D message is unchanged
        AugmentConfig(scale=1.0)
    with pytest.raises(ConfigError, match="Augment2dConfig"):
        augment_2d(*squares(1), AugmentConfig.book(), gen(0))


def test_2d_matrices_follow_the_config():
    n = 2000
    flips = random_affine_2d(n, Augment2dConfig(flip=True), generator=gen(1))
    assert flips.shape == (n, 2, 3)
    diagonal = torch.diagonal(flips[:, :, :2], dim1=1, dim2=2)
    assert set(diagonal.unique().tolist()) == {-1.0, 1.0}
    assert 0.45 < float((diagonal < 0).double().mean()) < 0.55
    assert torch.equal(flips[:, 0, 1], torch.zeros(n)) and torch.equal(flips[:, :, 2], torch.zeros(n, 2))
    moved = random_affine_2d(n, Augment2dConfig(offset=0.03, scale=0.2), generator=gen(2), dtype=torch.float64)
    assert float(moved[:, :, 2].abs().max()) <= 0.03 and float(moved[:, :, 2].abs().max()) > 0.029
    scales = torch.diagonal(moved[:, :, :2], dim1=1, dim2=2)
    assert float(scales.min()) >= 0.8 and float(scales.max()) <= 1.2
    turned = random_affine_2d(n, Augment2dConfig(rotate=True), generator=gen(3), dtype=torch.float64)
    rotations = turned[:, :, :2]
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(n, 2, 2))
    assert torch.equal(random_affine_2d(3, Augment2dConfig(), generator=gen(4)), torch.eye(2, 3).expand(3, 2, 3))


def test_2d_disabled_returns_the_inputs():
    image, mask = squares(2)
    out, out_mask = augment_2d(image, mask, Augment2dConfig(), gen(0))
    assert out is image and out_mask is mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_2d_mask_stays_aligned_with_the_image_and_binary(dtype):
    image, mask = squares(16, dtype=dtype)
    config = Augment2dConfig(flip=True, offset=0.1, scale=0.2, rotate=True)
    out, out_mask = augment_2d(image, mask, config, gen(5))
    assert out.dtype == dtype and out_mask.dtype == torch.bool and out_mask.shape == mask.shape
    bright = out[:, :1] > -300  # the image's midpoint, where the mask's 0/1 resampling crosses 0.5
    mismatched = int((bright != out_mask).sum())
    assert mismatched == 0 if dtype == torch.float64 else mismatched <= 4
    assert torch.equal(out[:, 0], out[:, 2])  # every channel gets the sample's transform
    areas = out_mask.sum(dim=(1, 2, 3)).double()
    # 120 pixels, scaled by 1/(1 ± 0.2) per axis, ± the resampled edge
    assert float(areas.min()) >= 0.6 * 120 and float(areas.max()) <= 1.65 * 120
    moved = (out_mask != mask).flatten(1).any(dim=1)
    assert bool(moved.all())  # each sample got its own transform


def test_2d_noise_goes_on_the_image_only_and_the_mask_follows_the_square():
    image, mask = squares(8)
    out, out_mask = augment_2d(image, mask, Augment2dConfig.book(), gen(6))
    inside, outside = out[out_mask.expand_as(out)], out[~out_mask.expand_as(out)]
    assert float(inside.median()) == pytest.approx(200.0, abs=10)
    assert float(outside.median()) == pytest.approx(-800.0, abs=10)
    # Only edge pixels, resampled to near the midpoint -300 HU, can be pushed across it by the noise.
    assert float((inside > -300).float().mean()) > 0.99 and float((outside < -300).float().mean()) > 0.999
    noisy, same_mask = augment_2d(image, mask, Augment2dConfig(noise=25.0), gen(7))
    assert torch.equal(same_mask, mask)
    assert float((noisy - image).double().std()) == pytest.approx(25.0, rel=0.03)


def test_2d_flips_are_exact_for_image_and_mask():
    image, mask = squares(64)
    image = image + torch.arange(48.0).view(1, 1, 1, 48)  # make left and right differ
    out, out_mask = augment_2d(image, mask, Augment2dConfig(flip=True), gen(8))
    flips = torch.diagonal(random_affine_2d(64, Augment2dConfig(flip=True), generator=gen(8))[:, :, :2], 0, 1, 2) < 0
    for k in range(64):
        dims = [d for d, flipped in ((3, flips[k, 0]), (2, flips[k, 1])) if flipped]
        assert torch.equal(out[k], image[k].flip([d - 1 for d in dims]) if dims else image[k])
        assert torch.equal(out_mask[k], mask[k].flip([d - 1 for d in dims]) if dims else mask[k])
    assert int(flips.all(dim=1).sum()) > 0 and int((~flips).all(dim=1).sum()) > 0


def test_2d_same_seed_same_result():
    image, mask = squares(4)
    a = augment_2d(image, mask, Augment2dConfig.book(), gen(9))
    b = augment_2d(image, mask, Augment2dConfig.book(), gen(9))
    c = augment_2d(image, mask, Augment2dConfig.book(), gen(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_2d_dtype_and_channels_last_are_kept(dtype):
    image, mask = squares(4, channels=7)
    layout = image.to(dtype).contiguous(memory_format=torch.channels_last)
    out, out_mask = augment_2d(layout, mask, Augment2dConfig.book(), gen(11))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    reference, reference_mask = augment_2d(image, mask, Augment2dConfig.book(), gen(11))
    assert torch.equal(out_mask, reference_mask)
    torch.testing.assert_close(out.float(), reference, atol=8.0, rtol=0.01)  # half-precision HU rounding
    as_int, _ = augment_2d(image.to(torch.int16), mask, Augment2dConfig(flip=True), gen(12))
    assert as_int.dtype == torch.float32


def test_2d_bad_inputs_give_clear_errors():
    image, mask = squares(2)
    with pytest.raises(DataFormatError, match="images"):
        augment_2d(image[0], mask, Augment2dConfig.book(), gen(0))
    with pytest.raises(DataFormatError, match=r"masks .*bool"):
        augment_2d(image, mask.float(), Augment2dConfig.book(), gen(0))
    with pytest.raises(DataFormatError, match=r"\(2, 1, 48, 48\)"):
        augment_2d(image, mask[:1], Augment2dConfig.book(), gen(0))
    with pytest.raises(ConfigError, match="augment_2d: generator"):
        augment_2d(image, mask, Augment2dConfig.book(), None)


def test_random_crop_2d_cuts_the_same_window_from_image_and_mask():
    n, size, side = 256, 64, 96
    positions = torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side)
    image = torch.cat([positions, -positions], dim=1).expand(n, 2, side, side).contiguous()
    mask = (positions.long() % 7 == 0).expand(n, 1, side, side).contiguous()
    out, out_mask = random_crop_2d(image, mask, size, gen(13))
    assert out.shape == (n, 2, size, size) and out_mask.shape == (n, 1, size, size) and out_mask.dtype == torch.bool
    top = (out[:, 0, 0, 0] // side).long()
    left = (out[:, 0, 0, 0] % side).long()
    for k in range(0, n, 17):
        window = (slice(None), slice(int(top[k]), int(top[k]) + size), slice(int(left[k]), int(left[k]) + size))
        assert torch.equal(out[k], image[k][window]) and torch.equal(out_mask[k], mask[k][window])
    assert int(top.min()) == 0 and int(top.max()) == side - size  # every position can come up
    assert int(left.min()) == 0 and int(left.max()) == side - size
    again, _ = random_crop_2d(image, mask, size, gen(13))
    assert torch.equal(again, out)


def test_random_crop_2d_sizes_and_layouts():
    image, mask = squares(3, channels=7)
    whole, whole_mask = random_crop_2d(image, mask, 48, gen(14))
    assert torch.equal(whole, image) and torch.equal(whole_mask, mask)
    layout = image.to(torch.int16).contiguous(memory_format=torch.channels_last)
    out, _ = random_crop_2d(layout, mask, 32, gen(15))
    assert out.dtype == torch.int16 and out.is_contiguous(memory_format=torch.channels_last)
    for size in (0, 49, 32.0, True):
        with pytest.raises(ConfigError, match="size"):
            random_crop_2d(image, mask, size, gen(0))


@pytest.mark.gpu
@cuda
def test_cuda_2d_augment_and_crop_are_reproducible_and_stay_on_the_device():
    image, mask = squares(8, channels=7)
    image, mask = image.cuda(), mask.cuda()
    for dtype in (torch.float32, torch.bfloat16):
        a = augment_2d(image.to(dtype), mask, Augment2dConfig.book(), gen(21, "cuda"))
        b = augment_2d(image.to(dtype), mask, Augment2dConfig.book(), gen(21, "cuda"))
        assert a[0].device == image.device and a[0].dtype == dtype and a[1].dtype == torch.bool
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    out, out_mask = augment_2d(
        image, mask, Augment2dConfig(flip=True, offset=0.1, scale=0.2, rotate=True), gen(22, "cuda")
    )
    assert int(((out[:, :1] > -300) != out_mask).sum()) <= 4  # aligned on the GPU too
    crop, crop_mask = random_crop_2d(image, mask, 32, gen(23, "cuda"))
    assert crop.device == image.device and crop.shape == (8, 7, 32, 32) and crop_mask.shape == (8, 1, 32, 32)
    with pytest.raises(ConfigError, match="generator is on cpu"):
        augment_2d(image, mask, Augment2dConfig.book(), gen(0))
