"""Batched augmentation: per-sample matrices, exact flips, offsets that move, noise, dtypes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from p2ch.augment import (
    BOOK_NOISE_HU,
    AugmentConfig,
    affine_grid,
    apply_affine,
    augment_batch,
    flip_batch,
    random_affine,
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
