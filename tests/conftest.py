"""Shared fixtures: tiny CTs and CSVs written in LUNA16's real layout into tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from p2ch.config import TrainingConfig
    from p2ch.model import LunaModel

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."


def load_script(relative: str):
    """A script of the repository (e.g. "benchmarks/time_to_cpm.py") as a module, loaded once and
    registered under its file name first (its dataclasses look their module up by name)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / relative
    name = path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def make_uid(n: int) -> str:
    return f"{UID_PREFIX}{100000000000 + n}"


def write_ct(
    root: Path,
    series_uid: str,
    hu: np.ndarray,
    *,
    subset: int = 0,
    spacing_xyz=(0.7, 0.7, 1.25),
    origin_xyz=(-180.0, -170.0, -320.0),
    direction=None,
) -> Path:
    """Write hu (I, R, C) int16 as <root>/subset<k>/<uid>.mhd + .raw with SimpleITK."""
    import SimpleITK as sitk

    folder = Path(root) / f"subset{subset}"
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(hu, dtype=np.int16))
    image.SetSpacing(tuple(float(v) for v in spacing_xyz))
    image.SetOrigin(tuple(float(v) for v in origin_xyz))
    if direction is not None:
        image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    path = folder / f"{series_uid}.mhd"
    sitk.WriteImage(image, str(path))
    return path


def write_csv(path: Path, header: str, rows, *, newline: str = "\n", bom: bool = False) -> Path:
    text = newline.join([header, *(",".join(str(v) for v in row) for row in rows)]) + newline
    data = text.encode("utf-8")
    if bom:
        data = b"\xef\xbb\xbf" + data
    Path(path).write_bytes(data)
    return Path(path)


@pytest.fixture(autouse=True)
def _float32_on_every_cpu(monkeypatch):
    """--amp auto of nodule_analysis runs bf16 on CPUs with bf16 instructions; the suite computes in
    float32 on every machine, so that its exact comparisons do not depend on the CPU that runs them
    (tests of the bf16 choice patch this back)."""
    monkeypatch.setattr("p2ch.runtime.cpu_bf16_native", lambda: False)


ANNOTATIONS_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm"
CANDIDATES_HEADER = "seriesuid,coordX,coordY,coordZ,class"


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """Two CTs (one in subset0, one in subset1) with two nodules and a few candidates.

    CT A: 40 × 64 × 64 voxels, spacing (0.7, 0.7, 1.25) mm, origin (-180, -170, -320); a 10 mm
    nodule of +100 HU at voxel (20, 30, 34) and a 5 mm one at (10, 10, 50).
    CT B: 30 × 50 × 60, spacing (0.9, 0.8, 2.0), origin (-200, -150, 900); no nodules.
    """
    root = tmp_path / "luna"
    uid_a, uid_b = make_uid(1), make_uid(2)
    hu_a = np.full((40, 64, 64), -850, dtype=np.int16)
    hu_a[0, 0, 0] = -3024  # out-of-field padding, must clip to -1000
    hu_a[1, 0, 0] = 3000  # metal, must clip to 1000
    hu_a[18:23, 26:35, 30:39] = 100
    write_ct(root, uid_a, hu_a, subset=0)
    hu_b = np.full((30, 50, 60), -800, dtype=np.int16)
    write_ct(root, uid_b, hu_b, subset=1, spacing_xyz=(0.9, 0.8, 2.0), origin_xyz=(-200, -150, 900))

    def xyz_a(i, r, c):
        return (-180.0 + c * 0.7, -170.0 + r * 0.7, -320.0 + i * 1.25)

    big = xyz_a(20, 30, 34)
    small = xyz_a(10, 10, 50)
    write_csv(
        root / "annotations.csv",
        ANNOTATIONS_HEADER,
        [
            (uid_a, *big, 10.0),
            (uid_a, *small, 5.0),
        ],
    )
    write_csv(
        root / "candidates.csv",
        CANDIDATES_HEADER,
        [
            (uid_a, big[0] + 1.0, big[1], big[2], 1),  # 1 mm off: matches the 10 mm nodule
            (uid_a, small[0], small[1] + 2.0, small[2], 1),  # 2 mm off: matches the 5 mm nodule
            (uid_a, big[0] + 20.0, big[1], big[2], 1),  # positive far from any annotation
            (uid_a, *xyz_a(5, 5, 5), 0),
            (uid_a, *xyz_a(39, 63, 63), 0),
            (uid_b, -200.0 + 30 * 0.9, -150.0 + 25 * 0.8, 900.0 + 15 * 2.0, 0),
            (uid_b, -200.0 + 2 * 0.9, -150.0 + 2 * 0.8, 900.0 + 1 * 2.0, 0),
        ],
    )
    return root


def make_model(seed: int = 0) -> LunaModel:
    """A LunaModel whose probabilities spread over a useful range (not saturated at 0 or 1).

    Fresh weights see raw HU (batch-norm running stats 0 / 1) and give logits in the tens; the
    input statistics and a smaller head make P(nodule) vary smoothly between candidates.
    """
    import torch

    from p2ch.model import LunaModel

    torch.manual_seed(seed)
    model = LunaModel().eval()
    with torch.no_grad():
        model.tail_batchnorm.running_mean.fill_(-500.0)
        model.tail_batchnorm.running_var.fill_(400.0**2)
        model.head_linear.weight.mul_(0.05)
        model.head_linear.bias.zero_()
    return model


def write_checkpoint(
    path: Path, model: LunaModel, config: TrainingConfig, *, arch: str | None = None, epoch: int = 3
) -> Path:
    """A checkpoint shaped like the training app's (see LunaTrainingApp._state)."""
    import torch

    from p2ch.checkpoint import save_checkpoint
    from p2ch.model import arch_signature

    save_checkpoint(
        {
            "arch": arch or arch_signature(model),
            "model": model.state_dict(),
            "optimizer": {},
            "scaler": None,
            "epoch": epoch,
            "samples_seen": 1000,
            "best_metric": 0.25,
            "best_epoch": epoch,
            "selected_by": "cpm",
            "config": {**config.to_dict(), "model_width": getattr(model, "conv_channels", config.model_width)},
            "run_time": "2025-01-01_00.00.00",
            "rng": {"torch": torch.get_rng_state()},
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory):
    """Factory of synthetic LUNA16-format data roots: `synth_set(num_cts=4, size=96, ...)`.

    Takes `p2ch.synth.generate`'s settings; each distinct set is generated once per test run and
    shared by every test that asks for it, so tests must not modify it (copy it first).
    """
    from p2ch.synth import generate

    made: dict[tuple, Path] = {}

    def make(**settings) -> Path:
        key = tuple(sorted(settings.items()))
        if key not in made:
            root = tmp_path_factory.mktemp("synth") / "luna"
            generate(root, **{"workers": 1, **settings})
            made[key] = root
        return made[key]

    return make


def chest_phantom(
    shape=(40, 96, 128), spacing_xyz=(1.0, 1.0, 2.0), with_lungs: bool = True, with_nodules: bool = True
) -> tuple[np.ndarray, dict[str, tuple[int, int, int]]]:
    """A chest CT cartoon, (I, R, C) int16 HU, and where its landmarks are (voxel index, row, col).

    Air (-1000) around an elliptic body (40 HU) that spans every slice; two lungs (-850 HU), ellipsoids
    in slices 4-35, one on each side of the mediastinum; landmarks: "juxtapleural", the centre of a
    6 mm solid nodule (50 HU) sitting on the outer wall of the right lung (its centre in the chest
    wall, its edge touching lung air); "inner", a 5 mm nodule inside the left lung; "mediastinum", a
    point in the soft tissue between the lungs, far from either. without lungs: the body alone; without
    nodules: the landmarks without the nodules.
    """
    hu = np.full(shape, -1000, dtype=np.int16)
    i, r, c = np.indices(shape, dtype=np.float64)
    dz, dy, dx = spacing_xyz[2], spacing_xyz[1], spacing_xyz[0]
    mid_r, mid_c = shape[1] / 2, shape[2] / 2
    body = ((r - mid_r) * dy / 42) ** 2 + ((c - mid_c) * dx / 60) ** 2 <= 1.0
    hu[body] = 40
    landmarks = {"mediastinum": (20, int(mid_r), int(mid_c))}
    if with_lungs:
        for centre_c in (mid_c - 28, mid_c + 28):  # right, left
            lung = ((i - 20) * dz / 32) ** 2 + ((r - mid_r) * dy / 28) ** 2 + ((c - centre_c) * dx / 20) ** 2 <= 1.0
            hu[lung] = -850
        wall_c = round(mid_c - 28 - 20 / dx)  # the right lung's outer wall at its widest
        juxta = (20, int(mid_r), wall_c - 1)
        inner = (20, int(mid_r) + 6, int(mid_c + 28))
        for centre, diameter in ((juxta, 6.0), (inner, 5.0)) if with_nodules else ():
            ball = ((i - centre[0]) * dz) ** 2 + ((r - centre[1]) * dy) ** 2 + ((c - centre[2]) * dx) ** 2
            hu[ball <= (diameter / 2) ** 2] = 50
        landmarks.update(juxtapleural=juxta, inner=inner)
    return hu, landmarks


WALL_PHANTOM_SPACING_XYZ = (1.25, 1.0, 2.0)  # lungs 30 mm apart: no pinch of tissue between them


def wall_nodule_phantom() -> tuple[np.ndarray, dict[str, tuple[int, int, int]], np.ndarray]:
    """`chest_phantom` at `WALL_PHANTOM_SPACING_XYZ` with one more nodule, 8 mm, on the left lung's outer wall
    (centre 3 mm inside the lung, landmark "wall_nodule"): (hu, landmarks, the wall nodule's centre as
    continuous (index, row, col))."""
    spacing = WALL_PHANTOM_SPACING_XYZ
    hu, landmarks = chest_phantom(spacing_xyz=spacing)
    mid_c = hu.shape[2] / 2
    outer_col = round(mid_c + 28 + 20 / spacing[0])  # the left lung's outer wall at its widest
    centre = np.array([20.0, hu.shape[1] / 2, outer_col - 3.0 / spacing[0]])
    i, r, c = np.indices(hu.shape, dtype=np.float64)
    step = np.array(spacing[::-1])
    ball = ((i - centre[0]) * step[0]) ** 2 + ((r - centre[1]) * step[1]) ** 2 + ((c - centre[2]) * step[2]) ** 2
    hu[ball <= 4.0**2] = 50
    landmarks["wall_nodule"] = tuple(round(float(v)) for v in centre)
    return hu, landmarks, centre
