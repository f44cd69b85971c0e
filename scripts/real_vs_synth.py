"""Side by side: a real CT slice and a synthetic one (`python -m p2ch.synth`) at the same mm scale and window.

The real image is any file SimpleITK reads (a DICOM slice such as pydicom's test file
CT_small.dcm, or a LUNA16 .mhd, whose middle slice is taken). The synthetic slice comes from a CT
made here in memory (`--seed`, `--index`, `--size`) or read from a LUNA16-layout root
(`--synth-root`, first series or `--series-uid`). It is cut at the real image's field of view in
mm, centred on the spine as in the real image (`--spine-at`), resampled to the real pixel grid and
averaged over the real slice thickness. A second row shows a lung field of the synthetic CT,
axial and coronal.

    .venv/bin/pip download --no-deps pydicom -d /tmp/pyd && cd /tmp/pyd && unzip -o pydicom-*.whl \\
        'pydicom/data/test_files/CT_small.dcm'
    .venv/bin/python scripts/real_vs_synth.py /tmp/pyd/pydicom/data/test_files/CT_small.dcm --out docs/real_vs_synth.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from p2ch import synth
from p2ch.cli import run_cli
from p2ch.errors import ConfigError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/real_vs_synth.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("real", type=Path, help="a real CT: a DICOM file or a .mhd (its middle slice)")
    parser.add_argument("--real-title", default=None, help="title of the real panel (default: real (<file name>))")
    parser.add_argument("--synth-root", type=Path, default=None, help="a synthetic LUNA16 root; default: make one CT")
    parser.add_argument("--series-uid", default=None, help="with --synth-root: the CT to show (default: the first)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CT made here")
    parser.add_argument("--index", type=int, default=0, help="index of the CT made here (CT k of the set)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of the CT made here")
    parser.add_argument("--slices", type=int, default=96, help="slices of the CT made here")
    parser.add_argument(
        "--spine-at",
        type=float,
        nargs=2,
        default=(0.5, 0.25),
        metavar=("COL", "ROW"),
        help="where the vertebral body's centre sits in the crop, as fractions of its width and height",
    )
    parser.add_argument("--window", type=float, nargs=2, default=(-1000.0, 400.0), metavar=("LO", "HI"), help="HU")
    parser.add_argument(
        "--lung-row",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add a row with a synthetic lung field, axial and coronal",
    )
    parser.add_argument("--out", type=Path, default=Path("real_vs_synth.png"), help="PNG to write")
    return parser


def read_real(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The real image's slice: (R, C) float32 HU and spacing (x, y, z) mm (z: the slice thickness)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass a DICOM file or a .mhd")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ConfigError(f"{path}: SimpleITK cannot read it ({str(exc).strip().splitlines()[-1]})") from None
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    if hu.ndim == 2:
        hu = hu[None]
    spacing = tuple(float(v) for v in image.GetSpacing()) + (1.0,) * (3 - image.GetDimension())
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.HasMetaDataKey("0018|0050"):  # DICOM slice thickness
        spacing = (spacing[0], spacing[1], float(reader.GetMetaData("0018|0050")))
    return hu[len(hu) // 2], spacing


def synthetic_ct(args) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray, np.ndarray, int]:
    """(I, R, C) float32 HU, spacing (x, y, z) mm, spine and right lung centres (row, col) in voxels, slice index."""
    if args.synth_root is None:
        plan = synth.plan_ct(
            args.index,
            size=args.size,
            slices=args.slices,
            candidates_per_ct=1,
            nodules_per_ct=1.3,
            seed=args.seed,
            direction="identity",
        )
        hu = synth.render_ct(plan).astype(np.float32)
        spacing = plan.spacing_xyz
        a = plan.anatomy
        # The lungs' widest level, where the picture has most lung.
        z_mm = a.lung_z_lo + (0.5 - 0.15) / 0.8 * (a.lung_z_hi - a.lung_z_lo)
        index = int(np.clip(round(z_mm / spacing[2]), 0, len(hu) - 1))
        s = float(a.scale(index * spacing[2]))
        spine_y = a.body_y + a.spine_y * a.body_b * s
        lung_rc = (a.body_y + a.lung_y * a.body_b * s, a.body_x - a.lung_x * a.body_a * s)
        spine_rc = (spine_y, a.body_x)
        return hu, spacing, np.divide(spine_rc, spacing[1::-1]), np.divide(lung_rc, spacing[1::-1]), index
    uids = (args.synth_root / "seriesuids.csv").read_text().split() if args.series_uid is None else [args.series_uid]
    paths = sorted(args.synth_root.glob(f"subset*/{uids[0]}.mhd")) if uids else []
    if not paths:
        raise ConfigError(f"no CT {uids[:1]} under {args.synth_root}/subset*/; pass a LUNA16-layout root")
    image = sitk.ReadImage(str(paths[0]))
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    index = len(hu) // 2
    # The spine: the biggest bone component in the middle third of the columns.
    bone = hu[index] > 300.0
    bone[:, : bone.shape[1] // 3] = False
    bone[:, 2 * bone.shape[1] // 3 :] = False
    labels, count = ndimage.label(bone)
    if not count:
        raise ConfigError(f"{paths[0]}: no bone found in the middle slice's central third")
    biggest = 1 + int(np.argmax(ndimage.sum(bone, labels, range(1, count + 1))))
    spine_rc = np.array(ndimage.center_of_mass(labels == biggest))
    lung_rc = spine_rc - np.array([0.3, 0.25]) * np.array(bone.shape)  # a guess: anterior and to the image's left
    return hu, image.GetSpacing(), spine_rc, lung_rc, index


def crop(hu, spacing, centre_rc, index, shape_rc, pixel_mm, thickness_mm, anchor) -> np.ndarray:
    """A (R, C) crop of hu (I, R, C) on a grid of pixel_mm (y, x) pixels, averaged over thickness_mm.

    centre_rc (row, col) voxels lands at `anchor` (col, row fractions) of the crop.
    """
    rows = (np.arange(shape_rc[0]) - anchor[1] * shape_rc[0]) * pixel_mm[0] / spacing[1] + centre_rc[0]
    cols = (np.arange(shape_rc[1]) - anchor[0] * shape_rc[1]) * pixel_mm[1] / spacing[0] + centre_rc[1]
    half = max(0, round(thickness_mm / spacing[2] / 2 - 0.5))
    slab = hu[max(0, index - half) : index + half + 1].mean(axis=0)
    grid = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(slab, grid, order=1, cval=-1000.0).astype(np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        real, real_spacing = read_real(args.real)
        hu, spacing, spine_rc, lung_rc, index = synthetic_ct(args)
        pixel_mm = (real_spacing[1], real_spacing[0])
        synthetic = crop(hu, spacing, spine_rc, index, real.shape, pixel_mm, real_spacing[2], args.spine_at)
        extent = (0, real.shape[1] * pixel_mm[1], real.shape[0] * pixel_mm[0], 0)
        lo, hi = args.window
        panels = [
            (real, extent, args.real_title or f"real ({args.real.name})"),
            (synthetic, extent, "synthetic"),
        ]
        if args.lung_row:
            # A lung field twice as wide, axial at the same slice, and coronal through its centre.
            wide = (2 * real.shape[0], 2 * real.shape[1])
            axial = crop(hu, spacing, lung_rc, index, wide, pixel_mm, spacing[2], (0.5, 0.5))
            coronal = hu[:, round(lung_rc[0]), :][::-1]
            c0 = max(0, int(lung_rc[1] - wide[1] * pixel_mm[1] / spacing[0] / 2))
            c1 = min(hu.shape[2], int(lung_rc[1] + wide[1] * pixel_mm[1] / spacing[0] / 2))
            panels += [
                (axial, (0, wide[1] * pixel_mm[1], wide[0] * pixel_mm[0], 0), "synthetic lung field, axial"),
                (coronal[:, c0:c1], (0, (c1 - c0) * spacing[0], 0, len(hu) * spacing[2]), "synthetic, coronal"),
            ]
        rows = 2 if args.lung_row else 1
        fig, axes = plt.subplots(rows, 2, figsize=(10, 5 * rows), squeeze=False)
        for ax, (image, box, title) in zip(axes.ravel(), panels, strict=True):
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, extent=box, interpolation="nearest")
            ax.set_title(title)
            ax.set_xlabel("mm")
        fig.suptitle(
            f"window {lo:g}..{hi:g} HU; synthetic: spacing {spacing[0]:.2f}×{spacing[1]:.2f}×{spacing[2]:.2f} mm, "
            f"top row averaged over {real_spacing[2]:g} mm like the real slice"
        )
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=80)
        print(f"wrote {args.out}")
        return 0

    return run_cli("real_vs_synth", body)


if __name__ == "__main__":
    sys.exit(main())
