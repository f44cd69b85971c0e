"""Label maps, probability maps and CT copies on the CT's grid, read back with SimpleITK."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from test_dicom import rotation

from p2ch.labelmap import (
    FORMATS,
    image_on_grid,
    label_dtype,
    label_volume,
    probability_volume,
    volume_name,
    write_volume,
)


def oblique_ct(shape=(6, 7, 8)):
    return SimpleNamespace(
        hu=np.zeros(shape, dtype=np.int16),
        voxel_size_xyz=(0.65, 0.8, 2.5),
        origin_xyz=(-150.25, 20.5, -301.0),
        direction=rotation((1.0, -2.0, 0.5), 0.35),
    )


def test_label_k_marks_the_kth_rows_component():
    labels = np.zeros((2, 3, 4), dtype=np.int32)
    labels[0, 0, :2] = 1  # component row 0
    labels[1, 2, 3] = 2  # row 1
    labels[1, 0, 0] = 3  # row 2
    out = label_volume(labels, np.array([2, 0]))  # nodules.csv: row 2 first, then row 0; row 1 is no nodule
    assert out.dtype == np.uint8
    assert out[1, 0, 0] == 1 and out[0, 0, :2].tolist() == [2, 2] and out[1, 2, 3] == 0
    assert int((out > 0).sum()) == 3
    # a nodule whose component has no voxel of its own (the last rows): no label on the map, and no failure
    assert label_volume(labels, np.array([4, 0]))[0, 0, :2].tolist() == [2, 2]
    assert label_volume(np.zeros((2, 2, 2), np.int32), np.array([], dtype=np.int64)).max() == 0
    many = np.arange(1, 301, dtype=np.int32).reshape(3, 10, 10)
    wide = label_volume(many, np.arange(300)[::-1])
    assert wide.dtype == np.uint16 and wide[0, 0, 0] == 300 and wide[2, 9, 9] == 1
    assert (label_dtype(255), label_dtype(256), label_dtype(70000)) == (np.uint8, np.uint16, np.uint32)


def test_probability_is_255_steps():
    prob = np.array([0.0, 0.001, 0.002, 0.5, 0.999, 1.0], dtype=np.float16).reshape(1, 2, 3)
    assert probability_volume(prob).ravel().tolist() == [0, 0, 1, 128, 255, 255]


@pytest.mark.parametrize("fmt", FORMATS)
def test_written_volumes_lie_on_the_cts_grid(tmp_path, fmt):
    ct = oblique_ct()
    values = np.random.default_rng(0).integers(0, 4, size=ct.hu.shape).astype(np.uint8)
    path = write_volume(image_on_grid(values, ct), tmp_path / "out" / volume_name("nodules_mask", fmt))
    assert path.name == f"nodules_mask.{fmt}"
    back = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), values)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(back.GetSpacing(), ct.voxel_size_xyz, rtol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), ct.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), ct.direction.ravel(), atol=1e-6)
    expected = {"nii.gz": ["nodules_mask.nii.gz"], "mhd": ["nodules_mask.mhd", "nodules_mask.zraw"],
                "nrrd": ["nodules_mask.nrrd"]}[fmt]  # fmt: skip
    assert sorted(p.name for p in path.parent.iterdir()) == expected, "no temporary files left"
    with pytest.raises(ValueError, match="not on the CT's grid"):
        image_on_grid(values[:-1], ct)
    with pytest.raises(ValueError, match="image format 'png'"):
        volume_name("x", "png")
