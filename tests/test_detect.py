"""p2ch.detect (segmenting a whole CT, its connected components) and inference.score_ct (CPU; one CUDA test)."""

from __future__ import annotations

import copy
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import SimpleITK as sitk
import torch

from p2ch.checkpoint import load_segmentation_model
from p2ch.ct import Ct
from p2ch.detect import (
    CandidateRule,
    Components,
    find_candidates,
    find_components,
    mask_from_probability,
    segment_ct,
    slab_batch,
)
from p2ch.errors import ConfigError, DataFormatError
from p2ch.inference import Scorer, predict_locations, score_ct, score_ct_then
from p2ch.seg_training import SegmentationTrainingApp
from p2ch.segdatasets import Luna2dSegmentationDataset
from p2ch.slices import SliceCache
from p2ch.unet import UNetWrapper

from conftest import WALL_PHANTOM_SPACING_XYZ, chest_phantom, make_model, make_uid, wall_nodule_phantom, write_ct

CPU = torch.device("cpu")
SPACING_XYZ = (0.7, 0.7, 1.25)
CONTEXT = 3


def make_unet(context_slices: int = CONTEXT, seed: int = 0) -> UNetWrapper:
    """A small UNet whose probabilities spread over (0, 1) on raw HU (not saturated at 0 or 1)."""
    torch.manual_seed(seed)
    model = UNetWrapper(in_channels=2 * context_slices + 1, depth=3, wf=2).eval()
    with torch.no_grad():
        model.input_batchnorm.running_mean.fill_(-500.0)
        model.input_batchnorm.running_var.fill_(400.0**2)
        model.unet.last.weight.mul_(500.0)  # fresh weights give logits of ~0.004 on this input
    return model


@pytest.fixture
def striped(tiny_root):
    """tiny_root plus CT 3: 12 × 32 × 48 voxels whose every slice differs (so repeated edges show)."""
    uid = make_uid(3)
    rng = np.random.default_rng(3)
    hu = (rng.integers(-1000, 1000, size=(12, 32, 48)) // 7 + np.arange(12)[:, None, None] * 60).astype(np.int16)
    write_ct(tiny_root, uid, np.clip(hu, -1000, 1000), subset=2)
    return tiny_root, uid


def training_input(image: torch.Tensor) -> torch.Tensor:
    """What the segmentation training app feeds its model for a loader batch (its own `_input`)."""
    return SegmentationTrainingApp._input(SimpleNamespace(device=CPU, channels_last=True), image)


# ---------------------------------------------------------------------------------------------
# segment_ct


def test_input_and_output_match_the_validation_dataset_slice_by_slice(striped, tmp_path):
    root, uid = striped
    ct = Ct(uid, root)
    dataset = Luna2dSegmentationDataset(SliceCache(tmp_path / "cache", root), [uid], CONTEXT, full_ct=True)
    assert dataset.slice_index.tolist() == list(range(12))
    for k in range(12):  # every slice, the first and last three with repeated edges among them
        expected = training_input(dataset[k].image[None])
        got = slab_batch(ct.hu, k, k + 1, CONTEXT, CPU)
        assert got.dtype == torch.float32 and torch.equal(got, expected)
    first = slab_batch(ct.hu, 0, 1, CONTEXT, CPU)[0]
    assert all(torch.equal(first[j], torch.from_numpy(ct.hu[0]).float()) for j in range(4))
    assert torch.equal(first[6], torch.from_numpy(ct.hu[3]).float())
    last = slab_batch(ct.hu, 11, 12, CONTEXT, CPU)[0]
    assert all(torch.equal(last[j], torch.from_numpy(ct.hu[11]).float()) for j in range(3, 7))
    model = make_unet()
    prob = segment_ct(model, ct, context_slices=CONTEXT, device="cpu", batch_size=5)
    assert prob.shape == ct.hu.shape and prob.dtype == np.float16
    with torch.no_grad():
        direct = torch.cat([model(training_input(dataset[k].image[None]))[:, 0] for k in range(12)]).numpy()
    assert 0.05 < direct.mean() < 0.95 and direct.std() > 0.01, "the test model must not saturate"
    np.testing.assert_allclose(prob.astype(np.float32), direct, atol=1e-3)


@pytest.mark.parametrize("channels_last", [True, False])
def test_batch_size_and_memory_format_do_not_change_the_result(tiny_root, channels_last):
    ct = Ct(make_uid(1), tiny_root)
    model = make_unet()
    reference = segment_ct(model, ct, context_slices=CONTEXT, device=CPU, batch_size=40, channels_last=False)
    for batch_size in (1, 7, 16):
        prob = segment_ct(
            model, ct, context_slices=CONTEXT, device=CPU, batch_size=batch_size, channels_last=channels_last
        )
        np.testing.assert_allclose(prob.astype(np.float32), reference.astype(np.float32), atol=2e-3)


def test_slabs_are_built_a_batch_at_a_time(tmp_path):
    hu = np.random.default_rng(0).integers(-1000, 1000, size=(64, 64, 64)).astype(np.int16)
    ct = SimpleNamespace(hu=hu)
    model = make_unet()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    full_slab_bytes = hu.size * (2 * CONTEXT + 1) * 4
    tracemalloc.start()
    try:
        prob = segment_ct(model, ct, context_slices=CONTEXT, device=CPU, batch_size=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prob.shape == hu.shape
    assert seen == [(4, 7, 64, 64)] * 16
    assert peak < full_slab_bytes / 8, f"numpy peak {peak} bytes, a full float slab is {full_slab_bytes}"


def test_a_slice_size_the_unet_cannot_take_is_padded_with_air_and_cut_back():
    hu = np.random.default_rng(1).integers(-1000, 1000, size=(3, 30, 42)).astype(np.int16)
    model = make_unet(context_slices=1)
    prob = segment_ct(model, SimpleNamespace(hu=hu), context_slices=1, device=CPU)
    padded = np.full((3, 32, 44), -1000, dtype=np.int16)
    padded[:, :30, :42] = hu
    expected = segment_ct(model, SimpleNamespace(hu=padded), context_slices=1, device=CPU)[:, :30, :42]
    assert prob.shape == (3, 30, 42)
    np.testing.assert_array_equal(prob, expected)


def test_segment_ct_refuses_bad_settings():
    ct = SimpleNamespace(hu=np.zeros((2, 8, 8), dtype=np.int16))
    with pytest.raises(ConfigError, match="context_slices"):
        segment_ct(make_unet(), ct, context_slices=-1, device=CPU)
    with pytest.raises(ConfigError, match="batch_size"):
        segment_ct(make_unet(), ct, context_slices=CONTEXT, device=CPU, batch_size=0)
    with pytest.raises(DataFormatError, match="int16"):
        segment_ct(make_unet(), SimpleNamespace(hu=ct.hu.astype(np.float32)), context_slices=CONTEXT, device=CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_result_matches_the_cpu_and_memory_stays_a_batch():
    hu = np.random.default_rng(2).integers(-1000, 1000, size=(96, 256, 256)).astype(np.int16)
    ct = SimpleNamespace(hu=hu)
    model = make_unet()
    cpu = segment_ct(model, ct, context_slices=CONTEXT, device=CPU, batch_size=8)
    device = torch.device("cuda")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    gpu = segment_ct(model, ct, context_slices=CONTEXT, device=device, batch_size=2)
    peak = torch.cuda.max_memory_allocated(device) - before
    full_slab_bytes = hu.size * (2 * CONTEXT + 1) * 4
    assert peak < full_slab_bytes / 2, f"CUDA peak {peak} bytes, a full float slab is {full_slab_bytes}"
    np.testing.assert_allclose(gpu.astype(np.float32), cpu.astype(np.float32), atol=5e-3)
    for channels_last in (True, False):
        amp = segment_ct(
            model, ct, context_slices=CONTEXT, device=device, amp_dtype=torch.bfloat16, channels_last=channels_last
        )
        assert amp.dtype == np.float16 and np.abs(amp.astype(np.float32) - cpu).mean() < 0.02


# ---------------------------------------------------------------------------------------------
# find_components


def sphere(shape, center_irc, diameter_mm, spacing_xyz=SPACING_XYZ) -> np.ndarray:
    """(I, R, C) bool: the voxels whose centres lie within the ball."""
    grid = np.indices(shape, dtype=np.float64)
    spacing_irc = np.asarray(spacing_xyz, dtype=np.float64)[::-1]
    dist2 = sum(((grid[a] - center_irc[a]) * spacing_irc[a]) ** 2 for a in range(3))
    return dist2 <= (diameter_mm / 2) ** 2


def fake_ct(hu, spacing_xyz=SPACING_XYZ, origin_xyz=(-100.0, -50.0, 20.0), direction=None):
    return SimpleNamespace(
        hu=hu,
        voxel_size_xyz=spacing_xyz,
        origin_xyz=origin_xyz,
        direction=np.eye(3) if direction is None else np.asarray(direction),
    )


def test_two_spheres_and_a_speck_are_counted_measured_and_filtered():
    shape = (48, 96, 96)
    small, large = sphere(shape, (16, 30, 30), 10.0), sphere(shape, (30, 64, 64), 16.0)
    mask = small | large
    mask[5, 80, 10] = True
    hu = np.full(shape, -800, dtype=np.int16)
    comps = find_components(mask, fake_ct(hu))
    assert isinstance(comps, Components) and len(comps) == 3
    order = np.argsort(comps.voxels)  # speck, 10 mm, 16 mm
    assert comps.voxels[order].tolist() == [1, int(small.sum()), int(large.sum())]
    voxel_mm3 = 0.7 * 0.7 * 1.25
    np.testing.assert_allclose(comps.volume_mm3, comps.voxels * voxel_mm3)
    np.testing.assert_allclose(comps.diameter_mm[order[1:]], [10.0, 16.0], rtol=0.1)
    np.testing.assert_allclose(comps.center_irc[order[1:]], [(16, 30, 30), (30, 64, 64)], atol=1e-9)
    assert comps.kept[order].tolist() == [False, True, True]
    assert comps.reason[order].tolist() == ["too_small", "", ""]
    assert comps.bbox_start_irc[order[0]].tolist() == [5, 80, 10] and comps.bbox_stop_irc[order[0]].tolist() == [
        6,
        81,
        11,
    ]
    lo, hi = comps.bbox_start_irc[order[2]], comps.bbox_stop_irc[order[2]]
    assert (hi - lo).tolist() == [int(np.ptp(a)) + 1 for a in np.nonzero(large)]
    strict = find_components(mask, fake_ct(hu), min_diameter_mm=12.0, max_diameter_mm=14.0)
    assert strict.reason[order].tolist() == ["too_small", "too_small", "too_large"]
    by_voxels = find_components(mask, fake_ct(hu), min_voxels=10_000, min_diameter_mm=0.0)
    assert by_voxels.reason[order].tolist() == ["too_small", "too_small", "too_small"]
    kept = comps.take(comps.kept)
    assert len(kept) == 2 and kept.center_xyz.shape == (2, 3) and set(kept.reason.tolist()) == {""}


def test_labels_mark_each_rows_voxels():
    shape = (20, 30, 30)
    a, b = sphere(shape, (6, 8, 8), 5.0), sphere(shape, (14, 20, 22), 7.0)
    mask = a | b
    mask[1, 28, 1] = True
    hu = np.full(shape, -700, dtype=np.int16)
    comps, labels = find_components(mask, fake_ct(hu), return_labels=True)
    assert labels.dtype == np.int32 and labels.shape == shape
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
    for j in range(len(comps)):
        voxels = labels == j + 1
        assert voxels.sum() == comps.voxels[j]
        np.testing.assert_allclose(np.argwhere(voxels).mean(axis=0), comps.center_irc[j], atol=1e-9)
    assert not labels[~mask].any()


def test_six_and_twenty_six_connectivity_differ_on_diagonal_neighbours():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[2, 2, 2] = mask[3, 3, 3] = True  # corners touch
    mask[6, 2, 2] = mask[6, 3, 3] = True  # edges touch
    ct = fake_ct(np.zeros((10, 10, 10), dtype=np.int16))
    loose = dict(min_voxels=1, min_diameter_mm=0.0)
    assert find_components(mask, ct, connectivity=26, **loose).voxels.tolist() == [2, 2]
    assert find_components(mask, ct, connectivity=6, **loose).voxels.tolist() == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="connectivity"):
        find_components(mask, ct, connectivity=18)


def test_centres_are_density_weighted_as_ndimage_computes_them():
    hu = np.full((8, 8, 8), -1000, dtype=np.int16)
    hu[4, 4, 5] = 1000
    mask = np.zeros(hu.shape, dtype=bool)
    mask[4, 4, 4:6] = True
    (center,) = find_components(mask, fake_ct(hu), min_voxels=1, min_diameter_mm=0.0).center_irc
    np.testing.assert_allclose(center, (4.0, 4.0, 4.0 + 2001.0 / 2002.0))
    # Many components of random density: the same numbers as the book's ndimage call.
    rng = np.random.default_rng(4)
    hu = rng.integers(-1000, 1001, size=(20, 30, 30)).astype(np.int16)
    mask = rng.random(hu.shape) < 0.2
    comps = find_components(mask, fake_ct(hu), min_voxels=1, min_diameter_mm=0.0)
    labels, count = scipy.ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    expected = scipy.ndimage.center_of_mass(hu.astype(np.float32) + 1001, labels, np.arange(1, count + 1))
    assert len(comps) == count > 5
    np.testing.assert_allclose(comps.center_irc, np.asarray(expected), atol=1e-9)
    np.testing.assert_array_equal(comps.voxels, np.bincount(labels.ravel())[1:])


def test_centres_in_world_mm_agree_with_simpleitk_for_an_oblique_ct(tmp_path):
    a, b = np.radians(25.0), np.radians(-40.0)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    direction = rot_z @ rot_x
    hu = np.random.default_rng(5).integers(-1000, 1000, size=(24, 40, 36)).astype(np.int16)
    uid = make_uid(7)
    path = write_ct(
        tmp_path, uid, hu, spacing_xyz=(0.8, 0.6, 1.5), origin_xyz=(12.5, -40.0, 300.0), direction=direction
    )
    ct = Ct(uid, tmp_path)
    mask = sphere(hu.shape, (8, 12, 10), 6.0, (0.8, 0.6, 1.5)) | sphere(hu.shape, (16, 28, 25), 8.0, (0.8, 0.6, 1.5))
    comps = find_components(mask, ct)
    assert len(comps) == 2
    image = sitk.ReadImage(str(path))
    expected = [
        image.TransformContinuousIndexToPhysicalPoint([float(v) for v in irc[::-1]]) for irc in comps.center_irc
    ]
    np.testing.assert_allclose(comps.center_xyz, np.asarray(expected), atol=1e-6)


def test_an_empty_mask_has_no_components_and_bad_masks_are_refused():
    ct = fake_ct(np.zeros((4, 8, 8), dtype=np.int16))
    comps = find_components(np.zeros((4, 8, 8), dtype=bool), ct)
    assert len(comps) == 0 and comps.center_xyz.shape == (0, 3) and comps.bbox_start_irc.shape == (0, 3)
    assert len(comps.take(comps.kept)) == 0
    with pytest.raises(DataFormatError, match="bool"):
        find_components(np.zeros((4, 8, 8), dtype=np.float32), ct)
    with pytest.raises(DataFormatError, match=r"\(4, 8, 8\)"):
        find_components(np.zeros((4, 8, 9), dtype=bool), ct)
    with pytest.raises(ConfigError, match="max_diameter_mm"):
        find_components(np.zeros((4, 8, 8), dtype=bool), ct, min_diameter_mm=5.0, max_diameter_mm=3.0)


def test_mask_from_probability_is_strictly_above_the_threshold():
    prob = np.array([0.2, 0.5, 0.51], dtype=np.float16).reshape(1, 1, 3)
    assert mask_from_probability(prob, 0.5).ravel().tolist() == [False, False, True]
    for bad in (0.0, 1.0, True, "0.5"):
        with pytest.raises(ConfigError, match="threshold"):
            mask_from_probability(prob, bad)


# ---------------------------------------------------------------------------------------------
# score_ct


def test_score_ct_gives_predict_locations_numbers_and_nan_outside(tiny_root):
    uid = make_uid(1)
    frame = pd.read_csv(tiny_root / "candidates.csv", dtype={"seriesuid": str})
    frame = frame[frame.seriesuid == uid][["seriesuid", "coordX", "coordY", "coordZ"]].reset_index(drop=True)
    outside = pd.DataFrame([{"seriesuid": uid, "coordX": 500.0, "coordY": 0.0, "coordZ": 0.0}])
    frame = pd.concat([frame.iloc[:2], outside, frame.iloc[2:]], ignore_index=True)
    scorer = Scorer(make_model(), CPU)
    width = (32, 48, 48)
    expected, _ = predict_locations(scorer, tiny_root, frame, width_irc=width, batch_size=2, progress=False)
    ct = Ct(uid, tiny_root)
    centers = frame[["coordX", "coordY", "coordZ"]].to_numpy()
    got = score_ct(scorer, ct, centers, width_irc=width, batch_size=2)
    assert got.dtype == np.float64 and got.shape == (len(frame),) and np.isnan(got[2])
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)
    assert np.isfinite(np.delete(got, 2)).all() and np.ptp(np.delete(got, 2)) > 1e-4
    np.testing.assert_allclose(score_ct(scorer, ct, centers, width_irc=width), got, rtol=1e-5, equal_nan=True)
    assert score_ct(scorer, ct, np.zeros((0, 3)), width_irc=width).shape == (0,)
    assert np.isnan(score_ct(scorer, ct, [[np.nan, 0.0, 0.0]], width_irc=width)).all()
    with pytest.raises(DataFormatError, match=r"\(N, 3\)"):
        score_ct(scorer, ct, np.zeros((2, 2)), width_irc=width)
    with pytest.raises(ConfigError, match="batch_size"):
        score_ct(scorer, ct, centers, width_irc=width, batch_size=0)


@pytest.mark.parametrize("flips", [False, True])
def test_a_second_model_scores_the_likely_rows_sharing_the_early_stages_or_whole(tiny_root, flips):
    uid = make_uid(1)
    frame = pd.read_csv(tiny_root / "candidates.csv", dtype={"seriesuid": str})
    ct = Ct(uid, tiny_root)
    centers = frame.loc[frame.seriesuid == uid, ["coordX", "coordY", "coordZ"]].to_numpy()[:7]
    centers = np.insert(centers, 3, [500.0, 0.0, 0.0], axis=0)  # outside the CT: nan, never kept
    nodule = make_model()
    malignancy = copy.deepcopy(nodule)  # fine-tuned at depth 2: block4 and the head changed
    with torch.no_grad():
        for param in [*malignancy.block4.parameters(), *malignancy.head_linear.parameters()]:
            param.add_(torch.randn_like(param) * param.std())
    nodule_scorer, malignancy_scorer = Scorer(nodule, CPU), Scorer(malignancy, CPU)
    width = (32, 48, 48)
    expected = score_ct(nodule_scorer, ct, centers, width_irc=width, batch_size=3, flips=flips)
    above = float(np.nanmedian(expected))
    likely = np.flatnonzero(expected > above)
    assert 0 < len(likely) < 7
    direct = score_ct(malignancy_scorer, ct, centers[likely], width_irc=width, flips=flips)
    for stages in (4, 0):  # the shared stages computed once; the second model whole
        got, follow = score_ct_then(
            nodule_scorer, malignancy_scorer, ct, centers, width_irc=width, batch_size=3, flips=flips,
            above=above, stages=stages,
        )  # fmt: skip
        np.testing.assert_array_equal(got, expected)
        assert follow.rows.tolist() == likely.tolist() and follow.seconds > 0
        np.testing.assert_allclose(follow.probability, direct, rtol=1e-5)
    assert np.abs(follow.probability - got[likely]).max() > 1e-3, "the malignancy head is the one that scored them"
    alone, nothing = score_ct_then(nodule_scorer, None, ct, centers, width_irc=width, flips=flips, above=above)
    np.testing.assert_array_equal(alone, expected)
    assert nothing.rows.shape == nothing.probability.shape == (0,)
    _, none_above = score_ct_then(nodule_scorer, malignancy_scorer, ct, centers, width_irc=width, above=1.0, stages=4)
    assert none_above.rows.shape == none_above.probability.shape == (0,)


# ---------------------------------------------------------------------------------------------
# the steps together, with a checkpoint written by python -m p2ch.seg_training


def test_a_seg_training_checkpoint_segments_a_ct_as_its_validation_did(synth_set, tmp_path):
    from p2ch import seg_training

    root = synth_set(num_cts=4, size=64, slices=24, candidates_per_ct=10, nodules_per_ct=2, seed=21)
    args = [
        "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
        "--checkpoint-dir", str(tmp_path / "models"), "--batch-size", "4", "--num-workers", "0",
        "--epoch-size", "4", "--crop-size", "32", "--val-fraction", "0.5", "--context-slices", "2",
        "--depth", "2", "--wf", "2", "--threshold", "0.4", "--log-level", "WARNING", "detect",
    ]  # fmt: skip
    assert seg_training.main([*args, "--epochs", "1"]) == 0
    (checkpoint,) = (tmp_path / "models").rglob("last.pt")
    model, settings = load_segmentation_model(checkpoint)
    assert settings["context_slices"] == 2 and settings["threshold"] == 0.4 and settings["info"]["epoch"] == 1
    uid = sorted(p.stem for p in root.glob("subset*/*.mhd"))[0]
    ct = Ct(uid, root)
    dataset = Luna2dSegmentationDataset(SliceCache(tmp_path / "cache", root), [uid], 2, full_ct=True)
    prob = segment_ct(model, ct, context_slices=2, device=CPU, batch_size=8)
    with torch.no_grad():
        for k in (0, 1, 12, 22, 23):
            direct = model(training_input(dataset[k].image[None]))[0, 0].numpy()
            np.testing.assert_allclose(prob[k].astype(np.float32), direct, atol=1e-3)
    comps = find_components(mask_from_probability(prob, settings["threshold"]), ct)
    assert comps.center_xyz.shape == (len(comps), 3)


# ---------------------------------------------------------------------------------------------
# find_candidates


def nodule_and_vessel(shape=(40, 80, 80)):
    """P of a 4.4 mm nodule (0.97 at its centre (20, 40, 30)) touching the end of a 1.8 mm × 30 mm vessel
    along the columns (0.8): one component whose density or probability centre lies outside the nodule."""
    grid = np.indices(shape, dtype=np.float64)
    spacing = np.asarray(SPACING_XYZ)[::-1]
    nodule_irc = np.array([20.0, 40.0, 30.0])
    d_nodule = np.sqrt(sum(((grid[a] - nodule_irc[a]) * spacing[a]) ** 2 for a in range(3)))
    d_axis = np.sqrt(((grid[0] - 20) * spacing[0]) ** 2 + ((grid[1] - 40) * spacing[1]) ** 2)
    along = (grid[2] - 30) * spacing[2]
    prob = np.where(d_nodule <= 2.2, 0.97 - 0.05 * d_nodule, 0.0)
    vessel = (d_axis <= 0.9) & (along >= 1.5) & (along <= 31.5)
    prob = np.where(vessel & (prob == 0), 0.8, prob).astype(np.float16)
    hu = np.where(prob > 0, 40, -850).astype(np.int16)
    return prob, fake_ct(hu), nodule_irc


def test_a_small_nodule_on_a_vessel_gets_a_candidate_inside_it_when_split():
    prob, ct, nodule_irc = nodule_and_vessel()
    nodule_xyz = np.asarray(ct.origin_xyz) + nodule_irc[::-1] * np.asarray(SPACING_XYZ)
    whole, _ = find_candidates(prob, ct, CandidateRule(split=False, lungs=False, max_candidates=0))
    split, labels = find_candidates(prob, ct, CandidateRule(lungs=False, max_candidates=0))
    assert len(whole) == 1 and len(split) >= 2
    assert np.linalg.norm(whole.center_xyz[0] - nodule_xyz) > 2.2  # the merged centre misses the nodule
    distance = np.linalg.norm(split.center_xyz - nodule_xyz, axis=1)
    best = int(np.argmin(distance))
    assert distance[best] <= 2.2 * 0.5 and split.score[best] == pytest.approx(0.97, abs=1e-3)
    assert split.diameter_mm[best] == pytest.approx(4.4, rel=0.35)  # the nodule's basin, not the vessel's
    # labels: value j + 1 on row j's voxels, every segmented voxel in exactly one row
    assert np.bincount(labels.ravel(), minlength=len(split) + 1)[1:].tolist() == split.voxels.tolist()
    assert ((labels > 0) == (prob > 0.5)).all()


def test_candidates_outside_the_lungs_are_dropped_and_juxtapleural_ones_kept():
    hu, landmarks = chest_phantom(spacing_xyz=(1.0, 1.0, 2.0))
    ct = fake_ct(hu, spacing_xyz=(1.0, 1.0, 2.0))
    prob = np.zeros(hu.shape, dtype=np.float16)
    for name in ("juxtapleural", "inner", "mediastinum"):
        i, r, c = landmarks[name]
        prob[i - 1 : i + 2, r - 2 : r + 3, c - 2 : c + 3] = 0.9
    comps, _ = find_candidates(prob, ct, CandidateRule(max_candidates=0))
    where = {name: int(np.argmin(np.linalg.norm(comps.center_irc - np.array(landmarks[name]), axis=1)))
             for name in landmarks}  # fmt: skip
    assert comps.reason[where["juxtapleural"]] == "" and comps.reason[where["inner"]] == ""
    assert comps.reason[where["mediastinum"]] == "outside_lungs" and not comps.kept[where["mediastinum"]]
    everywhere, _ = find_candidates(prob, ct, CandidateRule(lungs=False, max_candidates=0))
    assert everywhere.kept.all()


def test_a_wall_nodule_the_segmentation_misses_becomes_a_candidate_from_the_lungs_surface():
    hu, landmarks, centre = wall_nodule_phantom()
    ct = fake_ct(hu, spacing_xyz=WALL_PHANTOM_SPACING_XYZ)
    spacing = np.array(WALL_PHANTOM_SPACING_XYZ[::-1])
    prob = np.zeros(hu.shape, dtype=np.float16)
    i, r, c = landmarks["inner"]
    prob[i - 1 : i + 2, r - 2 : r + 3, c - 2 : c + 3] = 0.9  # the model finds the nodule inside the lung only
    comps, labels = find_candidates(prob, ct)
    assert comps.source.tolist() == ["segmentation", "lung surface"] and comps.kept.all()
    surface = comps.take(comps.source == "lung surface")
    assert np.linalg.norm((surface.center_irc[0] - centre) * spacing) <= 4.0  # LUNA16's hit rule: within its radius
    assert surface.score[0] == 0.0  # the segmentation's highest probability there
    assert (labels == 2).sum() == surface.voxels[0] and surface.diameter_mm[0] > 3.0
    assert (surface.bbox_start_irc[0] <= surface.center_irc[0]).all()
    assert (surface.center_irc[0] < surface.bbox_stop_irc[0]).all()
    for rule in (CandidateRule(surface_candidates=0), CandidateRule(lungs=False)):
        assert find_candidates(prob, ct, rule)[0].source.tolist() == ["segmentation"]
    # found by the segmentation already: no second candidate on the same nodule
    j, s, t = landmarks["wall_nodule"]
    both = prob.copy()
    both[j - 1 : j + 2, s - 2 : s + 3, t - 2 : t + 3] = 0.8
    assert find_candidates(both, ct)[0].source.tolist() == ["segmentation", "segmentation"]
    # on top of max_candidates: neither source takes the other's place
    capped, _ = find_candidates(prob, ct, CandidateRule(max_candidates=1))
    assert capped.source.tolist() == ["segmentation", "lung surface"] and capped.kept.all()


def test_at_most_max_candidates_are_kept_the_surest_first():
    shape = (24, 48, 48)
    prob = np.zeros(shape, dtype=np.float16)
    for k, p in enumerate((0.7, 0.95, 0.8, 0.6)):
        prob[10:14, 10:14, 4 + 11 * k : 8 + 11 * k] = p
    prob[2, 2, 2] = 0.99  # one voxel: too small, never counted against the limit
    comps, _ = find_candidates(
        prob, fake_ct(np.full(shape, -800, np.int16)), CandidateRule(lungs=False, max_candidates=2)
    )
    kept = sorted(np.round(comps.score[comps.kept], 2).tolist())
    assert kept == [0.8, 0.95]
    assert sorted(comps.reason.tolist()) == ["", "", "over_max_candidates", "over_max_candidates", "too_small"]


def test_candidate_rule_settings_are_checked():
    prob = np.zeros((4, 8, 8), dtype=np.float16)
    ct = fake_ct(np.zeros((4, 8, 8), np.int16))
    for bad in (CandidateRule(threshold=1.0), CandidateRule(centre="middle"), CandidateRule(max_candidates=-1),
                CandidateRule(peak_distance_mm=0.0), CandidateRule(surface_candidates=-1)):  # fmt: skip
        with pytest.raises(ConfigError):
            find_candidates(prob, ct, bad)
    with pytest.raises(DataFormatError, match="prob"):
        find_candidates(np.zeros((4, 8, 9), np.float16), ct)


def test_a_region_gives_the_whole_slices_probabilities_inside_it():
    """Boxes start on the pooling grid and reach the UNet's receptive radius: inside, nothing changes."""
    from p2ch.unet import receptive_radius

    rng = np.random.default_rng(5)
    hu = rng.integers(-1000, 400, size=(6, 80, 72)).astype(np.int16)
    model = make_unet(context_slices=1)
    whole = segment_ct(model, SimpleNamespace(hu=hu), context_slices=1, device=CPU, batch_size=4)
    region = np.tile(np.array([13, 80, 9, 72]), (6, 1))  # odd starts: one pixel off the grid of 4
    region[0] = 0  # a slice without a box: not segmented
    boxed = segment_ct(model, SimpleNamespace(hu=hu), context_slices=1, device=CPU, batch_size=4, region=region)
    reach = receptive_radius(3)
    inside = (slice(1, 6), slice(13 - 13 % 4 + reach, 80), slice(9 - 9 % 4 + reach, 72))
    np.testing.assert_allclose(boxed[inside], whole[inside], atol=1e-3)  # float16 rounding of other batch shapes
    assert (boxed[0] == 0).all() and (boxed[:, :12] == 0).all() and (boxed[:, :, :8] == 0).all()
    with pytest.raises(DataFormatError, match="region"):
        segment_ct(model, SimpleNamespace(hu=hu), context_slices=1, device=CPU, region=np.zeros((5, 4), np.int64))
