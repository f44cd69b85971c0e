"""Synthetic LUNA16-format data: chest-CT-like volumes, nodules, candidates, in LUNA16's real layout.

`python -m p2ch.synth --out DIR` (console script `p2ch-synth`) writes what the LUNA16 download
holds, so that every command of the project runs without the 120 GB of real data:

    DIR/subset0 … subset9/<series_uid>.mhd + .raw   MetaIO, MET_SHORT (int16) HU, CT k in subset k % 10
    DIR/annotations.csv            seriesuid,coordX,coordY,coordZ,diameter_mm     (the nodules)
    DIR/annotations_excluded.csv   seriesuid,coordX,coordY,coordZ,diameter_mm     (findings to ignore;
                                   diameter_mm -1 where LUNA16 knows no size, as in the real file)
    DIR/annotations_with_malignancy.csv   the book's chapter 14 file: annotations.csv's rows (same
                                   order, centres and diameters) + mal_bool,mal_details,bboxLowX..Z,
                                   bboxHighX..Z,len_mal_details (readers' ratings, see below)
    DIR/candidates.csv             seriesuid,coordX,coordY,coordZ,class
    DIR/seriesuids.csv             one series uid per line, no header (LUNA16's evaluation script
                                   reads every line as a uid)
    DIR/masks/<series_uid>.mhd + .raw   only with --masks: the true nodule labels, MET_UCHAR with the
                                   CT's size, spacing, origin and direction; k+1 on the CT's k-th
                                   nodule (annotations.csv order), 0 elsewhere (see `render_mask`)

Coordinates are patient/world mm (x, y, z) and come from SimpleITK's own index → physical point
transform of each written image, so they are right for any direction matrix.

What a CT holds, laid out in mm relative to the field of view (so it stays plausible for any voxel
count) with absolute sizes for nodules and vessels: a circular field of view padded outside with
-3024 or -2000 HU; a body whose elliptic cross-section varies along z, with subcutaneous fat
(~-100 HU), muscle and mediastinum (~40 HU); ribs, arcs in the chest wall that descend anteriorly,
with an oval cross-section 8–12 mm tall and 4–6 mm across (cortex 600–900 HU around 200–320 HU
marrow); a spine (vertebral body 25–35 mm, canal and discs) with lung beside it; two lungs
(~-850 HU, denser posteriorly) with a trachea at the top; vessel trees (+20..60 HU) from each
hilum: branches that taper linearly from their own calibre (4–7 mm at the roots) to their
children's, bend gently (2–3 straight pieces each) and fork at their ends, down to about 1 mm, the
hard negatives; nodules of 3–30 mm (2.5 mm + a log-normal: mean 8 mm, median 7 mm, slightly
lobulated) that are solid (~+50 HU, all of those under 5 mm), part-solid (ground-glass halo with a
solid core) or ground-glass (-500..-300 HU), about a quarter of them touching the lung wall; small
(< 3 mm) nodules and calcified benign findings listed in annotations_excluded.csv.

Partial volume: every structure has a soft edge, a linear ramp across its surface whose width is
sqrt(0.8² + Σ (n_k·spacing_k)²) mm for the surface's unit normal n (`_edge`), an approximation of
each voxel's box-filter integral; thin vessels keep their mass (`_thin_factor`). So a 1 mm vessel
crossing 2.5 mm slices is a fainter, continuous streak, and a voxel is "inside" (weight > 1/2, the
rule of `render_mask`) exactly when its centre is. Noise: 20–40 HU with a CT kernel's texture,
white noise smoothed within each slice (grains of about a millimetre, `_noise_filter`),
independent between slices.

Candidates: exactly `candidates_per_ct` rows per CT: 1–3 per nodule (class 1, centre within
0.3 × radius of the nodule's, so LUNA16's hit rule "within diameter/2" matches them), one on most
excluded findings (class 0), the rest class 0 on vessels (55 %), lung tissue (25 %) and elsewhere in
the body (20 %). With the defaults about 1 candidate in 400 is positive, as in LUNA16.

Malignancy: 3 or 4 simulated readers (mostly 4) rate each nodule 1..5 around a latent suspicion
score z = -0.55 + 1.5·ln(diameter / 6 mm) + kind offset (part-solid +0.7, solid 0, ground-glass
-0.8) + 0.8·lobulation amplitude / 0.12 + N(0, 0.5²): reader i rates clip(rint(3 + z + N(0, 0.7²)),
1, 5); mal_bool is True when at least two readers rate 4 or 5, the real file's rule. So bigger,
part-solid and lobulated nodules are malignant more often, about 40 % of them with the defaults,
and what the CT shows predicts about 80 % of the labels (constants: `MAL_*`, `plan_malignancy`).
The bounding box is that of the nodule's lobulated surface, in world mm. The ratings come from a
random stream of their own, so the CTs and the other CSVs are the same as without them.

Guarantee (for tests that need both classes): when `nodules_per_ct > 0`, CT k (generation order,
the order of seriesuids.csv) has at least one nodule, and so at least one positive candidate,
unless k % 3 == 2; those CTs have no nodules. So any set of 3 or more CTs has CTs with and CTs
without nodules, and any two consecutive CTs include one with nodules.

Everything is determined by the settings and `seed`: the same settings write byte-identical
files whatever the number of worker processes. CT k depends only on (seed, k) and the per-CT
settings, so a smaller `num_cts` gives a prefix of a bigger set.

This module depends on numpy, SimpleITK and `p2ch.config` only, never on the pipeline it tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from p2ch.cli import run_cli
from p2ch.config import DefaultsHelpFormatter, resolve_data_root
from p2ch.errors import ConfigError
from p2ch.luna import (
    ANNOTATION_COLUMNS,
    ANNOTATIONS_FILE,
    CANDIDATE_COLUMNS,
    CANDIDATE_FILES,
    EXCLUDED_FILE,
    MALIGNANCY_COLUMNS,
    MALIGNANCY_FILE,
    NUM_SUBSETS,
    SERIESUIDS_FILE,
    SUBSET_GLOB,
    subset_name,
)

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
ANNOTATIONS_HEADER = ",".join(ANNOTATION_COLUMNS)
CANDIDATES_HEADER = ",".join(CANDIDATE_COLUMNS)
MALIGNANCY_HEADER = ",".join(MALIGNANCY_COLUMNS)
CANDIDATES_FILE = CANDIDATE_FILES[0]
CSV_FILES = (ANNOTATIONS_FILE, EXCLUDED_FILE, MALIGNANCY_FILE, CANDIDATES_FILE, SERIESUIDS_FILE)
MASKS_DIR = "masks"  # --masks: <out>/masks/<series_uid>.mhd + .raw, the true nodule labels

DEFAULT_NUM_CTS = 10
DEFAULT_SIZE = 256
DEFAULT_SLICES = 128
DEFAULT_CANDIDATES_PER_CT = 780  # with 1.3 nodules and 1.5 positives per nodule: 1 in 400
DEFAULT_NODULES_PER_CT = 1.3  # LUNA16: 1,186 nodules in 888 CTs
MAX_NODULES_PER_CT = 10
MIN_SIZE, MAX_SIZE = 32, 1024
MIN_SLICES, MAX_SLICES = 16, 1024
MAX_CANDIDATES_PER_CT = 1_000_000

# Direction matrices, row-major as SimpleITK's SetDirection takes them.
_C15, _S15 = math.cos(math.radians(15.0)), math.sin(math.radians(15.0))
_C8, _S8 = math.cos(math.radians(8.0)), math.sin(math.radians(8.0))
DIRECTIONS: dict[str, tuple[float, ...]] = {
    # LUNA16's own: every real CT has the identity.
    "identity": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    # Columns run towards -x and slices towards -z (a 180° turn about y).
    "flipped": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    # Rz(15°) · Rx(8°): no axis lines up with the world's.
    "oblique": (_C15, -_S15 * _C8, _S15 * _S8, _S15, _C15 * _C8, -_C15 * _S8, 0.0, _S8, _C8),
}

# Candidate kinds (`CtPlan.candidate_kind`); only "nodule" is class 1.
KIND_NODULE, KIND_EXCLUDED, KIND_VESSEL, KIND_LUNG, KIND_BODY = "nodule", "excluded", "vessel", "lung", "body"
_NEGATIVE_MIX = (0.55, 0.25, 0.20)  # vessel, lung, body
_EASY_NEGATIVE_MIX = (0.0, 1.0, 0.0)  # easy sets: negatives in lung tissue only, none on vessels
_EASY_MIN_DIAMETER_MM = 6.0
_POSITIVES_PER_NODULE = ((1, 2, 3), (0.6, 0.3, 0.1))
_JITTER_FRACTION = 0.3  # of the nodule radius
_NO_NODULE_EVERY = 3  # CT k has no nodules when k % 3 == 2
MAX_LOBULATION = 0.12  # a nodule's lobulation amplitude (Σ|lobes|) is uniform in 0..0.12
_EDGE_MM = 0.8  # the scanner's blur: soft-edge width of every structure before the voxel's extent (`_edge`)
_NOISE_GRAIN_MM = 0.7  # in-plane sd of the noise's Gaussian grain (`_noise_filter`)
_AIR_HU = -1000.0


class SynthConfigError(ConfigError):
    """A setting of the synthetic data generator has an unusable value (the message says which)."""


# --------------------------------------------------------------------------------------- anatomy


def _soft(distance_mm, edge_mm=_EDGE_MM):
    """Partial-volume weight of a structure at signed distance `distance_mm` (negative inside).

    A linear ramp `edge_mm` wide (a scalar or an array like `distance_mm`) centred on the surface:
    weight 1/2 exactly on it, so "weight > 1/2" is "centre inside" whatever the edge.
    """
    return np.clip(0.5 - distance_mm / edge_mm, 0.0, 1.0)


def _edge(*normal_times_spacing):
    """Soft-edge width (mm) where the surface's unit normal n meets voxels of spacing s (mm).

    sqrt(_EDGE_MM² + Σ (n_k·s_k)²): the scanner's blur widened by the voxel's extent across the
    surface, a ramp that approximates the voxel's box-filter integral (partial volume). So a
    structure crossing 2.5 mm slices fades over a slice, not over 0.8 mm, and a thin vessel stays
    visible as a fainter, continuous streak instead of dots where it misses voxel centres.
    """
    total = np.float32(_EDGE_MM**2)
    for v in normal_times_spacing:
        total = total + v * v
    return np.sqrt(total)


def _thin_factor(radius_mm, edge_mm):
    """Weight factor (≤ 1) that keeps the mass of a structure thinner than its edge (radius < edge/2).

    The ramp integrates to (r + w/2)² / w across a slab of half-thickness r < w/2, more than its
    true 2r; scaling by 2rw / (r + w/2)² restores it, so sub-voxel vessels fade instead of glowing.
    """
    half = edge_mm * np.float32(0.5)
    return np.where(radius_mm < half, 2.0 * radius_mm * edge_mm / (radius_mm + half) ** 2, np.float32(1.0))


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One CT's body, lungs and bones as functions of position.

    Positions are "local mm": (x, y, z) = (col × spacing_x, row × spacing_y, slice × spacing_z),
    i.e. millimetres along the volume's own axes from voxel (0, 0, 0). Row numbers grow
    posteriorly and slice numbers superiorly, as in LUNA16. Shapes are "normalised" to the body's
    semi-axes (a, b) at each z: X = (x - body_x) / (a·s(z)), Y = (y - body_y) / (b·s(z)).
    """

    fov_x: float
    fov_y: float
    fov_radius: float
    body_x: float
    body_y: float
    body_a: float
    body_b: float
    wave_amp: float
    wave_period: float
    wave_phase: float
    fat_frac: float
    lung_x: float  # normalised offset of each lung's centre from the midline
    lung_y: float
    lung_sx: float  # normalised semi-axes at the widest level
    lung_sy: float
    lung_rho_max: float  # lungs stay inside this normalised radius (inside the ribs)
    lung_z_lo: float  # mm: base of the lungs
    lung_z_hi: float  # mm: apex
    lung_hu: float
    lung_grad_hu: float  # denser posteriorly (gravity)
    med_x: float
    med_y: float
    med_sx: float
    med_sy: float
    spine_y: float  # normalised
    spine_r: float  # normalised to b
    vert_period: float
    vert_phase: float
    cortical_mm: float
    disc_half_mm: float
    rib_rho: float
    rib_half_mm: float  # half thickness across the wall (the oval's short semi-axis)
    rib_half_z_mm: float  # half height along z (its long semi-axis)
    rib_cortex_mm: float  # bright cortical shell around the rib's marrow
    rib_period: float
    rib_phase: float
    rib_slope: float  # mm of z per radian around the body: ribs descend anteriorly
    trachea_r: float
    trachea_u: float  # above this fraction of the lung height
    fat_hu: float
    muscle_hu: float
    bone_hu: float
    marrow_hu: float

    def scale(self, z):
        """Body size factor along z (broadcastable like z)."""
        return 1.0 + self.wave_amp * np.sin(2.0 * np.pi * z / self.wave_period + self.wave_phase)

    def lung_profile(self, z):
        """Lung size factor along z: 0 outside the lungs, 1 at the widest level."""
        u = (z - self.lung_z_lo) / (self.lung_z_hi - self.lung_z_lo)
        inside = (u > 0.0) & (u < 1.0)
        return np.where(inside, np.abs(np.sin(np.pi * (0.15 + 0.8 * np.clip(u, 0.0, 1.0)))) ** 0.6, 0.0)

    def _frame(self, x, y, z):
        s = self.scale(z)
        return (x - self.body_x) / (self.body_a * s), (y - self.body_y) / (self.body_b * s), s

    def _spine_distance(self, x, y, s):
        """Distance (mm) from the vertebral body's axis, and its radius (mm)."""
        radius = self.spine_r * self.body_b * s
        dy = y - (self.body_y + self.spine_y * self.body_b * s)
        return np.sqrt((x - self.body_x) ** 2 + dy**2), radius

    def _mediastinum(self, nx, ny, s):
        mr = np.sqrt(((nx - self.med_x) / self.med_sx) ** 2 + ((ny - self.med_y) / self.med_sy) ** 2)
        return mr, (mr - 1.0) * self.med_sx * self.body_a * s

    def _lungs(self, x, y, z, nx, ny, s, rho, edge=_EDGE_MM):
        """Lung weight in [0, 1] (both lungs), with soft edges `edge` mm wide."""
        p = self.lung_profile(z)
        safe_p = np.maximum(p, 1e-3)
        alpha = 0.0
        for side in (-1.0, 1.0):
            lr = np.sqrt(
                ((nx - side * self.lung_x) / (self.lung_sx * safe_p)) ** 2
                + ((ny - self.lung_y) / (self.lung_sy * safe_p)) ** 2
            )
            dist = np.where(p > 0.0, (lr - 1.0) * self.lung_sx * safe_p * self.body_a * s, 1e3)
            alpha = np.maximum(alpha, _soft(dist, edge))
        _, med_dist = self._mediastinum(nx, ny, s)
        spine_dist, spine_radius = self._spine_distance(x, y, s)
        return (
            alpha
            * _soft((rho - self.lung_rho_max) * self.body_b * s, edge)
            * (1.0 - _soft(med_dist, edge))
            * (1.0 - _soft(spine_dist - 1.3 * spine_radius, edge))
        )

    def lung_alpha(self, x, y, z):
        """Lung weight in [0, 1] at local-mm positions (arrays broadcast); > 0.5 means lung."""
        nx, ny, s = self._frame(x, y, z)
        return self._lungs(x, y, z, nx, ny, s, np.sqrt(nx**2 + ny**2))

    def body_rho(self, x, y, z):
        """Normalised radius in the body's cross-section: < 1 inside the skin."""
        nx, ny, _ = self._frame(x, y, z)
        return np.sqrt(nx**2 + ny**2)

    def rib_weights(self, nx, ny, z, rho, b_mm, spacing_mm=(0.0, 0.0, 0.0)):
        """Partial-volume weights of the ribs' outer surface and of their marrow, each like rho, in [0, 1].

        A rib is an arc in the chest wall whose band descends anteriorly; its cross-section is an
        oval, rib_half_z_mm along z by rib_half_mm across the wall, with a marrow oval
        rib_cortex_mm inside. Distances to an oval are the first-order (q - 1) / |∇q| estimate.
        Computed only in the ring of the chest wall that can hold ribs (a few % of the voxels).
        """
        shape = np.broadcast_shapes(np.shape(nx), np.shape(ny), np.shape(z), np.shape(b_mm))
        weights = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
        b_mm = np.broadcast_to(b_mm, shape)
        dr_all = (np.broadcast_to(rho, shape) - self.rib_rho) * b_mm
        reach = self.rib_half_mm + _EDGE_MM + max(spacing_mm)
        ring = np.nonzero(np.abs(dr_all) < reach)
        if not len(ring[0]):
            return weights
        dr = dr_all[ring]
        around = np.arctan2(np.abs(np.broadcast_to(nx, shape)[ring]), np.broadcast_to(ny, shape)[ring])
        phase = (np.broadcast_to(z, shape)[ring] + self.rib_slope * around - self.rib_phase) / self.rib_period
        dz = (phase - np.round(phase)) * self.rib_period
        arc = (around > 0.35) & (around < 2.7)  # no ribs over the spine and the sternum
        for weight, shrink in zip(weights, (0.0, self.rib_cortex_mm), strict=True):
            hz, hr = self.rib_half_z_mm - shrink, self.rib_half_mm - shrink
            q = np.sqrt((dz / hz) ** 2 + (dr / hr) ** 2)
            gz, gr = dz / hz**2, dr / hr**2
            grad = np.sqrt(gz**2 + gr**2)
            norm = np.maximum(grad / np.maximum(q, 1e-6), 1.0 / max(hz, hr))
            inv = 1.0 / np.maximum(grad, 1e-6)
            edge = _edge(gz * inv * spacing_mm[2], gr * inv * spacing_mm[0])
            weight[ring] = _soft((q - 1.0) / norm, edge) * arc
        return weights

    def background_hu(self, x, y, z, spacing_mm=(0.0, 0.0, 0.0)):
        """HU of air, fat, muscle, mediastinum, bone and lung (no vessels, nodules or noise).

        x: (1, 1, C), y: (1, R, 1), z: (I, 1, 1) float32 local mm; spacing_mm: the voxel size
        (x, y, z) mm that widens each soft edge across it (`_edge`; 0: point samples). Returns
        (I, R, C) float32 HU.
        """
        nx, ny, s = self._frame(x, y, z)
        rho = np.sqrt(nx**2 + ny**2)
        b_mm = self.body_b * s
        # Skin, fat, muscle, lungs and spine run along z: their edges widen with the in-plane spacing.
        edge = float(_edge(spacing_mm[0]))
        hu = _AIR_HU + (self.fat_hu - _AIR_HU) * _soft((rho - 1.0) * b_mm, edge)
        inner = _soft((rho - (1.0 - self.fat_frac)) * b_mm, edge)
        hu += (self.muscle_hu - hu) * inner
        rib, rib_marrow = self.rib_weights(nx, ny, z, rho, b_mm, spacing_mm)
        hu += (self.bone_hu - hu) * rib
        hu += (self.marrow_hu - hu) * rib_marrow
        # Mediastinal fat around the heart, then the lungs.
        mr, med_dist = self._mediastinum(nx, ny, s)
        hu += (self.fat_hu - hu) * inner * (1.0 - _soft(med_dist, edge)) * _soft((mr - 1.15) * self.med_sx * b_mm, edge)
        lung = self._lungs(x, y, z, nx, ny, s, rho, edge)
        hu += (self.lung_hu + self.lung_grad_hu * ny - hu) * lung
        # Trachea (air in the upper mediastinum).
        u = (z - self.lung_z_lo) / (self.lung_z_hi - self.lung_z_lo)
        tdist = np.sqrt((x - self.body_x) ** 2 + (y - (self.body_y - 0.2 * b_mm)) ** 2)
        hu += (_AIR_HU - hu) * _soft(tdist - self.trachea_r, edge) * (u > self.trachea_u)
        # Spine: cortical shell, marrow or intervertebral disc (edges across slices), arch and canal behind.
        sdist, sradius = self._spine_distance(x, y, s)
        hu += (self.bone_hu - hu) * _soft(sdist - sradius, edge)
        vphase = (z - self.vert_phase) / self.vert_period
        disc_dist = np.abs(vphase - np.round(vphase)) * self.vert_period - self.disc_half_mm
        disc = _soft(disc_dist, float(_edge(spacing_mm[2])))
        core = self.marrow_hu + (80.0 - self.marrow_hu) * disc
        hu += (core - hu) * _soft(sdist - (sradius - self.cortical_mm), edge)
        canal_y = self.body_y + self.spine_y * b_mm + 1.5 * sradius
        cdist = np.sqrt((x - self.body_x) ** 2 + (y - canal_y) ** 2)
        hu += (self.bone_hu - hu) * _soft(cdist - 0.75 * sradius, edge)
        hu += (20.0 - hu) * _soft(cdist - 0.45 * sradius, edge)
        return hu


def _plan_anatomy(rng: np.random.Generator, width_mm: float, height_mm: float, depth_mm: float) -> Anatomy:
    u = rng.uniform
    z_lo = u(0.0, 0.06) * depth_mm
    z_hi = u(0.94, 1.0) * depth_mm
    return Anatomy(
        fov_x=width_mm / 2,
        fov_y=height_mm / 2,
        fov_radius=min(width_mm, height_mm) / 2,
        body_x=width_mm * (0.5 + u(-0.03, 0.03)),
        body_y=height_mm * (0.5 + u(0.0, 0.04)),
        body_a=width_mm * u(0.40, 0.45),
        body_b=height_mm * u(0.30, 0.35),
        wave_amp=u(0.03, 0.07),
        wave_period=depth_mm * u(1.2, 2.0),
        wave_phase=u(0, 2 * np.pi),
        fat_frac=u(0.05, 0.09),
        lung_x=u(0.40, 0.44),
        lung_y=u(-0.07, -0.03),
        lung_sx=u(0.33, 0.38),
        lung_sy=u(0.68, 0.76),
        lung_rho_max=0.80,
        lung_z_lo=z_lo,
        lung_z_hi=z_hi,
        lung_hu=u(-880.0, -820.0),
        lung_grad_hu=u(20.0, 60.0),
        med_x=u(0.02, 0.07),
        med_y=u(-0.08, 0.0),
        med_sx=u(0.18, 0.23),
        med_sy=u(0.45, 0.55),
        # Vertebral body 25–35 mm wide for an adult chest, lung beside it, back muscle behind.
        spine_y=u(0.42, 0.48),
        spine_r=u(0.09, 0.11),
        # Bones keep their real size in mm but shrink with a small field of view (tiny test sets).
        vert_period=min(u(22.0, 30.0), 0.15 * width_mm),
        vert_phase=u(0.0, 30.0),
        cortical_mm=min(2.0, 0.012 * width_mm),
        disc_half_mm=min(2.5, 0.015 * width_mm),
        rib_rho=u(0.85, 0.87),
        rib_half_mm=min(u(2.0, 3.0), 0.02 * width_mm),  # ribs 4–6 mm across the wall
        rib_half_z_mm=min(u(4.0, 6.0), 0.03 * width_mm),  # and 8–12 mm tall
        rib_cortex_mm=min(u(1.0, 1.5), 0.008 * width_mm),
        rib_period=min(u(24.0, 34.0), 0.2 * width_mm),
        rib_phase=u(0.0, 34.0),
        rib_slope=min(u(10.0, 20.0), 0.1 * width_mm),
        trachea_r=min(u(7.0, 10.0), 0.05 * width_mm),
        trachea_u=u(0.72, 0.85),
        fat_hu=u(-120.0, -80.0),
        muscle_hu=u(30.0, 55.0),
        bone_hu=u(600.0, 900.0),
        marrow_hu=u(200.0, 320.0),
    )


# ------------------------------------------------------------------------------------ CT plans


@dataclasses.dataclass(frozen=True)
class Finding:
    """A nodule or an excluded finding: a slightly lobulated sphere.

    center_mm: local mm (see `Anatomy`); center_xyz: world mm from SimpleITK. diameter_mm: drawn
    size; listed_diameter_mm: what the CSV says (-1 for benign findings, as LUNA16 writes).
    kind: "solid", "part-solid", "ground-glass", "small" or "calcified". hu: density (of the
    halo for part-solid); core_hu / core_fraction: part-solid core. lobes: (5,) shape coefficients.
    """

    center_mm: tuple[float, float, float]
    center_xyz: tuple[float, float, float]
    diameter_mm: float
    listed_diameter_mm: float
    kind: str
    hu: float
    core_hu: float
    core_fraction: float
    juxtapleural: bool
    lobes: tuple[float, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class CtPlan:
    """Everything about one synthetic CT except its voxels (those come from `render_ct`).

    shape_irc: (slices, rows, cols). spacing_xyz, origin_xyz: mm; direction: 9 floats, row-major.
    vessels: (V, 8) float64 [x0, y0, z0, x1, y1, z1, r0, r1] local mm (tapering pieces). candidate_xyz: (N, 3)
    float64 world mm; candidate_class: (N,) int8; candidate_kind: N strings (KIND_*), all in CSV order.
    """

    index: int
    seed: int
    series_uid: str
    subset: int
    shape_irc: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]
    pad_hu: int
    noise_hu: float
    vessel_hu: float
    anatomy: Anatomy
    nodules: tuple[Finding, ...]
    excluded: tuple[Finding, ...]
    vessels: np.ndarray
    candidate_xyz: np.ndarray
    candidate_class: np.ndarray
    candidate_kind: tuple[str, ...]

    @property
    def mhd_name(self) -> str:
        return f"{subset_name(self.subset)}/{self.series_uid}.mhd"

    @property
    def mask_name(self) -> str:
        return f"{MASKS_DIR}/{self.series_uid}.mhd"


def _reference_image(spacing_xyz, origin_xyz, direction):
    """A 1-voxel image carrying the CT's geometry, for SimpleITK's own coordinate transforms."""
    image = sitk.Image([1, 1, 1], sitk.sitkInt16)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin_xyz)
    image.SetDirection(direction)
    return image


def _to_world(image, points_mm: np.ndarray, spacing_xyz) -> np.ndarray:
    """World mm of local-mm points (K, 3) via SimpleITK's TransformContinuousIndexToPhysicalPoint."""
    index = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3) / np.asarray(spacing_xyz)
    return np.array(
        [image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p))) for p in index], dtype=np.float64
    ).reshape(-1, 3)


def _make_uid(rng: np.random.Generator) -> str:
    digits = rng.integers(0, 10, size=30)
    digits[0] = rng.integers(1, 10)
    return UID_PREFIX + "".join(map(str, digits))


@functools.cache
def _probe_directions() -> np.ndarray:
    """(26, 3) unit vectors towards the faces, edges and corners of a cube: where to test a sphere's rim."""
    steps = (-1, 0, 1)
    grid = np.array([(i, j, k) for i in steps for j in steps for k in steps if (i, j, k) != (0, 0, 0)], dtype=float)
    return grid / np.linalg.norm(grid, axis=1, keepdims=True)


_Placed = tuple[np.ndarray, float, bool]  # centre (3,) local mm, radius mm, juxtapleural


class _Placer:
    """Rejection sampling of positions inside the lungs or the body, in local mm."""

    def __init__(self, rng: np.random.Generator, anatomy: Anatomy, extent_mm: np.ndarray):
        self.rng = rng
        self.anatomy = anatomy
        self.extent = extent_mm  # (3,) largest local mm coordinate of a voxel centre per axis
        self.taken: list[tuple[np.ndarray, float]] = []  # (centre, radius) of placed findings

    def _random_points(self, count: int) -> np.ndarray:
        a = self.anatomy
        lo = np.array([a.body_x - a.body_a * 1.1, a.body_y - a.body_b * 1.1, 0.0])
        hi = np.array([a.body_x + a.body_a * 1.1, a.body_y + a.body_b * 1.1, self.extent[2]])
        lo, hi = np.maximum(lo, 0.0), np.minimum(hi, self.extent)
        return lo + self.rng.random((count, 3)) * (hi - lo)

    def _in_lung(self, points: np.ndarray) -> np.ndarray:
        return self.anatomy.lung_alpha(points[..., 0], points[..., 1], points[..., 2]) > 0.5

    def clear_of_findings(self, points: np.ndarray, radius: float, gap_mm: float) -> np.ndarray:
        ok = np.ones(len(points), dtype=bool)
        for centre, other in self.taken:
            ok &= np.linalg.norm(points - centre, axis=1) > radius + other + gap_mm
        return ok

    def finding(self, radius: float, juxtapleural: bool, min_radius: float) -> _Placed | None:
        """A centre for a sphere of `radius` mm in the lungs (shrunk if it does not fit), or None.

        juxtapleural: touching the lung's wall; falls back to a free-standing sphere when no place fits.
        """
        modes = (True, False) if juxtapleural else (False,)
        for mode in modes:
            placed = self._place(radius, mode, min_radius)
            if placed is not None:
                return placed
        return None

    def _place(self, radius: float, juxtapleural: bool, min_radius: float) -> _Placed | None:
        a = self.anatomy
        span = a.lung_z_hi - a.lung_z_lo
        probe = _probe_directions()[None]
        while True:
            margin = radius + 1.5
            z_lo = max(a.lung_z_lo + 0.1 * span, margin)
            z_hi = min(a.lung_z_hi - 0.1 * span, self.extent[2] - margin)
            if z_hi > z_lo:
                for _ in range(6):
                    points = self._random_points(512)
                    points[:, 2] = z_lo + self.rng.random(len(points)) * (z_hi - z_lo)
                    ok = self._in_lung(points) & self.clear_of_findings(points, radius, 1.5)
                    inner = 0.5 if juxtapleural else 1.0
                    probes = points[:, None, :] + inner * radius * probe
                    ok &= self._in_lung(probes).all(axis=1)
                    if juxtapleural:
                        outer = points[:, None, :] + 1.25 * radius * probe
                        ok &= ~self._in_lung(outer).all(axis=1)
                    hits = np.flatnonzero(ok)
                    if len(hits):
                        centre = points[hits[0]]
                        self.taken.append((centre, radius))
                        return centre, radius, juxtapleural
            if radius <= min_radius:
                return None
            radius = max(min_radius, radius * 0.8)

    def fallback(self, radius: float) -> _Placed:
        """The centre of a lung at its widest level: always lung, whatever the field of view."""
        a = self.anatomy
        u_max = (0.5 - 0.15) / 0.8  # where the lung profile peaks
        z = a.lung_z_lo + u_max * (a.lung_z_hi - a.lung_z_lo)
        z = float(np.clip(z, 0.0, self.extent[2]))
        s = float(a.scale(z))
        centre = np.array([a.body_x + a.lung_x * a.body_a * s, a.body_y + a.lung_y * a.body_b * s, z])
        self.taken.append((centre, radius))
        return centre, radius, False

    def points(self, count: int, where: str, avoid_gap_mm: float = 2.0) -> np.ndarray:
        """`count` points in the lungs ("lung") or in the body outside the lungs ("body")."""
        out: list[np.ndarray] = []
        have = 0
        for _ in range(200):
            if have >= count:
                break
            points = self._random_points(max(256, 4 * (count - have)))
            lung = self._in_lung(points)
            if where == "lung":
                ok = lung
            else:
                ok = ~lung & (self.anatomy.body_rho(points[:, 0], points[:, 1], points[:, 2]) < 0.95)
            ok &= self.clear_of_findings(points, 0.0, avoid_gap_mm)
            out.append(points[ok])
            have += int(ok.sum())
        found = np.concatenate(out) if out else np.empty((0, 3))
        if len(found) < count:  # a degenerate field of view: fall back to any point in the volume
            extra = self._random_points(count - len(found))
            found = np.concatenate([found, extra])
        return found[:count]


def _nodule_diameter(rng: np.random.Generator, max_diameter: float) -> float:
    # 2.5 mm + a log-normal around 4.5 mm: mean 7.9 mm, median 7 mm, 80 % under 10 mm, 3 % under
    # 4 mm, as LUNA16's (3–32 mm, mean 8.3 mm); no pile of nodules at the 3.2 mm floor, right next
    # to the < 3 mm findings that are labelled negative.
    diameter = 2.5 + float(np.exp(rng.normal(np.log(4.5), 0.6)))
    return float(np.clip(diameter, min(3.2, max_diameter), min(30.0, max_diameter)))


def _lobes(rng: np.random.Generator, amplitude: float) -> tuple[float, ...]:
    c = rng.normal(size=5)
    return tuple(float(v) for v in amplitude * c / np.abs(c).sum())


def _turned(rng: np.random.Generator, d: np.ndarray, lo_deg: float, hi_deg: float) -> np.ndarray:
    """Unit vectors (N, 3) at a random angle in [lo_deg, hi_deg] from the unit vectors `d` (N, 3)."""
    v = rng.normal(size=d.shape)
    perp = v - (v * d).sum(axis=1, keepdims=True) * d
    perp /= np.linalg.norm(perp, axis=1, keepdims=True)
    angle = np.radians(rng.uniform(lo_deg, hi_deg, size=(len(d), 1)))
    out = np.cos(angle) * d + np.sin(angle) * perp
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _plan_vessels(rng: np.random.Generator, anatomy: Anatomy, lung_semi_mm: float) -> np.ndarray:
    """Branching trees from each hilum into its lung: (V, 8) [x0, y0, z0, x1, y1, z1, r0, r1] mm.

    Each branch tapers linearly from its own calibre to its children's (r1 = r0 × 0.8–0.9) and is
    drawn as 2–3 straight pieces with small turns (a gentle curve); it splits at its end into two
    shorter children that start exactly there, with about its end calibre (× 0.85–1.0), down to
    about 0.5 mm. A branch whose end would leave the lung is shortened or turned, and dropped if
    neither helps. Grown a generation at a time so each generation is one vectorised lung test.
    """
    a = anatomy
    span = a.lung_z_hi - a.lung_z_lo
    roots_per_lung = 8
    side = np.repeat([-1.0, 1.0], roots_per_lung)
    z = a.lung_z_lo + (0.5 + rng.uniform(-0.12, 0.12, size=len(side))) * span
    s = a.scale(z)
    start = np.stack([a.body_x + side * 0.24 * a.body_a * s, a.body_y - 0.04 * a.body_b * s, z], axis=1)
    d = np.stack(
        [side * rng.uniform(0.3, 1.0, len(side)), rng.uniform(-0.9, 0.9, len(side)), rng.uniform(-1.5, 1.5, len(side))],
        axis=1,
    )
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    length = lung_semi_mm * rng.uniform(0.6, 0.9, len(side))
    radius = np.minimum(rng.uniform(2.0, 3.5, len(side)), max(0.7, 0.12 * lung_semi_mm))
    segments = []
    for _generation in range(6):
        if not len(start):
            break
        # Try the planned direction, then 3 turned ones, each at full and at 0.6 length.
        tries = np.stack([d, *(_turned(rng, d, 20.0, 60.0) for _ in range(3))], axis=1)  # (n, 4, 3)
        ends = start[:, None, None, :] + (
            tries[:, :, None, :] * (length[:, None, None, None] * np.array([1.0, 0.6])[None, None, :, None])
        )
        ends = ends.reshape(len(start), 8, 3)
        ok = a.lung_alpha(ends[..., 0], ends[..., 1], ends[..., 2]) > 0.5
        keep = ok.any(axis=1)
        first = ok.argmax(axis=1)
        rows = np.flatnonzero(keep)
        end = ends[rows, first[rows]]
        d = tries[rows, first[rows] // 2]
        start, length, radius = start[rows], length[rows], radius[rows]
        end_radius = radius * rng.uniform(0.8, 0.9, len(radius))
        segments.append(_curved_pieces(rng, start, end, radius, end_radius))
        grow = end_radius >= 0.5
        start, d, length, radius = end[grow], d[grow], length[grow], end_radius[grow]
        start, d = np.repeat(start, 2, axis=0), _turned(rng, np.repeat(d, 2, axis=0), 15.0, 45.0)
        length = np.repeat(length, 2) * rng.uniform(0.65, 0.85, 2 * len(length))
        radius = np.repeat(radius, 2) * rng.uniform(0.85, 1.0, 2 * len(radius))
    return np.concatenate(segments, axis=0) if segments else np.empty((0, 8))


def _curved_pieces(
    rng: np.random.Generator, start: np.ndarray, end: np.ndarray, r0: np.ndarray, r1: np.ndarray
) -> np.ndarray:
    """Branches start (n, 3) → end (n, 3) mm as 2–3 joined pieces each: (≤ 3n, 8) rows as `_plan_vessels`.

    The inner joints move sideways by 3–8 % of the branch length (turns of about 5–20°); the
    radius runs linearly from r0 to r1 (n,) along the branch, so pieces meet with equal calibre.
    """
    n = len(start)
    pieces = rng.integers(2, 4, size=n)  # 2 or 3 per branch
    chord = end - start
    t = np.stack([np.zeros(n), np.full(n, 1 / 3), np.full(n, 2 / 3), np.ones(n)], axis=1)  # (n, 4)
    t[pieces == 2, 1:3] = 0.5  # two pieces: one joint at the middle (the 1/3 and 2/3 joints coincide)
    side = rng.normal(size=(n, 2, 3))
    side -= (side @ chord[:, :, None]) / np.maximum((chord * chord).sum(axis=1), 1e-9)[:, None, None] * chord[:, None]
    side /= np.maximum(np.linalg.norm(side, axis=2, keepdims=True), 1e-9)
    offset = side * (np.linalg.norm(chord, axis=1)[:, None, None] * rng.uniform(0.03, 0.08, size=(n, 2, 1)))
    offset[pieces == 2, 1] = offset[pieces == 2, 0]
    joints = start[:, None] + t[:, :, None] * chord[:, None]  # (n, 4, 3)
    joints[:, 1:3] += offset
    joints[:, 0], joints[:, 3] = start, end  # exactly: children start where their parent ends
    radii = r0[:, None] + t * (r1 - r0)[:, None]  # (n, 4)
    rows = np.concatenate([joints[:, :-1], joints[:, 1:], radii[:, :-1, None], radii[:, 1:, None]], axis=2)
    keep = np.ones((n, 3), dtype=bool)
    keep[pieces == 2, 1] = False  # the zero-length piece between coinciding joints
    return rows[keep]


def _nodule_count(rng: np.random.Generator, index: int, nodules_per_ct: float) -> int:
    if nodules_per_ct <= 0 or index % _NO_NODULE_EVERY == _NO_NODULE_EVERY - 1:
        return 0
    # Two CTs in three have nodules: 1 + Poisson(lam) of them keeps the mean at nodules_per_ct.
    lam = max(0.0, nodules_per_ct * _NO_NODULE_EVERY / (_NO_NODULE_EVERY - 1) - 1.0)
    return int(min(MAX_NODULES_PER_CT, 1 + rng.poisson(lam)))


def _plan_geometry(rng: np.random.Generator, index: int, size: int, slices: int, direction: str):
    """Spacing (x, y, z) mm, origin (x, y, z) mm and the largest local mm per axis (3,)."""
    spacing_xy = round(float(rng.uniform(0.5, 1.0)), 6)
    spacing_z = float(rng.choice([0.625, 0.7, 0.75, 0.8, 1.0, 1.25, 1.5, 1.8, 2.0, 2.5]))
    extent = np.array([(size - 1) * spacing_xy, (size - 1) * spacing_xy, (slices - 1) * spacing_z])
    # As LUNA16's: x, y about -250..-150 mm; z negative for even CTs, positive for odd ones.
    origin = np.array(
        [
            rng.uniform(-250.0, -150.0),
            rng.uniform(-250.0, -150.0),
            rng.uniform(-400.0, -50.0) if index % 2 == 0 else rng.uniform(50.0, 1500.0),
        ]
    )
    # A reversed axis starts at the other end, so the world box is the one the identity would give.
    diagonal = np.diag(np.array(DIRECTIONS[direction]).reshape(3, 3))
    origin = origin + np.where(diagonal < 0, extent, 0.0)
    return (spacing_xy, spacing_xy, spacing_z), tuple(round(float(v), 4) for v in origin), extent


def _plan_nodules(
    rng: np.random.Generator, placer: _Placer, count: int, max_diameter: float, easy: bool = False
) -> list[Finding]:
    """`count` nodules in the lungs (fewer if they do not fit, but at least one when count > 0).

    easy: solid nodules of at least 6 mm (where the lungs leave room).
    """
    nodules: list[Finding] = []
    for _ in range(count):
        diameter = _nodule_diameter(rng, max_diameter)
        if easy:
            diameter = min(max(diameter, _EASY_MIN_DIAMETER_MM), max_diameter)
        placed = placer.finding(diameter / 2, bool(rng.random() < 0.25), min(1.6, diameter / 2))
        if placed is None:
            if nodules:
                continue
            placed = placer.fallback(min(diameter / 2, 1.6))
        centre, radius, juxtapleural = placed
        roll = rng.random()
        # Ground-glass and part-solid nodules under 5 mm would be lost in the noise.
        kinds = ("solid", "part-solid", "ground-glass")
        kind = kinds[0] if radius * 2 < 5.0 or easy else kinds[int(np.searchsorted([0.65, 0.8], roll, side="right"))]
        hu = {
            "solid": rng.uniform(20.0, 80.0),
            "part-solid": rng.uniform(-550.0, -350.0),
            "ground-glass": rng.uniform(-500.0, -300.0),
        }[kind]
        core_hu, core_fraction = float(rng.uniform(0.0, 60.0)), float(rng.uniform(0.35, 0.6))
        nodules.append(
            Finding(
                center_mm=tuple(map(float, centre)),
                center_xyz=(math.nan,) * 3,
                diameter_mm=2 * radius,
                listed_diameter_mm=2 * radius,
                kind=kind,
                hu=float(hu),
                core_hu=core_hu,
                core_fraction=core_fraction if kind == "part-solid" else 0.0,
                juxtapleural=juxtapleural,
                lobes=_lobes(rng, rng.uniform(0.0, MAX_LOBULATION)),
            )
        )
    return nodules


def _plan_excluded(rng: np.random.Generator, placer: _Placer, max_diameter: float) -> list[Finding]:
    """0–3 findings for annotations_excluded.csv: small nodules (< 3 mm) and calcified granulomas."""
    findings: list[Finding] = []
    for _ in range(int(rng.integers(0, 4))):
        calcified = bool(rng.random() < 0.4)
        diameter = min(rng.uniform(2.0, 5.0) if calcified else rng.uniform(1.5, 2.9), max_diameter)
        placed = placer.finding(diameter / 2, False, diameter / 2)
        if placed is None:
            continue
        centre, radius, _ = placed
        hu = rng.uniform(300.0, 800.0) if calcified else rng.uniform(0.0, 80.0)
        findings.append(
            Finding(
                center_mm=tuple(map(float, centre)),
                center_xyz=(math.nan,) * 3,
                diameter_mm=2 * radius,
                # LUNA16 lists findings without a measured size with diameter_mm -1.
                listed_diameter_mm=-1.0 if calcified else 2 * radius,
                kind="calcified" if calcified else "small",
                hu=float(hu),
                core_hu=0.0,
                core_fraction=0.0,
                juxtapleural=False,
                lobes=_lobes(rng, 0.05),
            )
        )
    return findings


def _jittered(rng: np.random.Generator, centre, radius: float) -> np.ndarray:
    """A point uniformly distributed in the ball of radius 0.3 × `radius` around `centre`."""
    v = rng.normal(size=3)
    return np.asarray(centre) + v / np.linalg.norm(v) * radius * _JITTER_FRACTION * rng.random() ** (1 / 3)


def _vessel_points(rng: np.random.Generator, placer: _Placer, vessels: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` points near vessel axes (within 0.3 × the local radius), weighted by length × radius."""
    starts, ends, r0, r1 = vessels[:, :3], vessels[:, 3:6], vessels[:, 6], vessels[:, 7]
    weights = np.linalg.norm(ends - starts, axis=1) * (r0 + r1) / 2
    picked: list[np.ndarray] = []
    for _ in range(50):
        if len(picked) >= count or not len(vessels):
            break
        k = rng.choice(len(vessels), size=2 * (count - len(picked)) + 8, p=weights / weights.sum())
        v = rng.normal(size=(len(k), 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        t = rng.random(len(k))
        radius = r0[k] + t * (r1[k] - r0[k])
        points = starts[k] + t[:, None] * (ends[k] - starts[k]) + v * (radius * _JITTER_FRACTION)[:, None]
        ok = (
            placer.clear_of_findings(points, 0.0, 2.0)
            & (points >= 0).all(axis=1)
            & (points <= placer.extent).all(axis=1)
        )
        picked.extend(points[ok][: count - len(picked)])
    return np.array(picked, dtype=np.float64).reshape(-1, 3)


def _plan_candidates(
    rng: np.random.Generator,
    placer: _Placer,
    nodules: list[Finding],
    excluded: list[Finding],
    vessels: np.ndarray,
    count: int,
    easy: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """`count` candidates: local mm (count, 3) and their kinds, shuffled.

    easy: negatives only in lung tissue (none on vessels, excluded findings or the body).
    """
    local: list[np.ndarray] = []
    kinds: list[str] = []
    for nodule in nodules:
        for _ in range(int(rng.choice(_POSITIVES_PER_NODULE[0], p=_POSITIVES_PER_NODULE[1]))):
            local.append(_jittered(rng, nodule.center_mm, nodule.diameter_mm / 2))
            kinds.append(KIND_NODULE)
    for finding in excluded:
        if rng.random() < 0.7 and not easy:
            local.append(_jittered(rng, finding.center_mm, finding.diameter_mm / 2))
            kinds.append(KIND_EXCLUDED)
    local, kinds = local[:count], kinds[:count]
    mix = _EASY_NEGATIVE_MIX if easy else _NEGATIVE_MIX
    n_vessel, n_lung, n_body = (int(v) for v in rng.multinomial(count - len(local), mix))
    on_vessels = _vessel_points(rng, placer, vessels, n_vessel)
    n_lung += n_vessel - len(on_vessels)
    local.extend(on_vessels)
    kinds.extend([KIND_VESSEL] * len(on_vessels))
    for n, where, kind in ((n_lung, "lung", KIND_LUNG), (n_body, "body", KIND_BODY)):
        if n:
            local.extend(placer.points(n, where))
            kinds.extend([kind] * n)
    order = rng.permutation(len(local))
    local_mm = np.clip(np.array(local, dtype=np.float64).reshape(-1, 3)[order], 0.0, placer.extent)
    return local_mm, [kinds[i] for i in order]


def plan_ct(
    index: int,
    *,
    size: int,
    slices: int,
    candidates_per_ct: int,
    nodules_per_ct: float,
    seed: int,
    direction: str,
    easy: bool = False,
) -> CtPlan:
    """Plan CT number `index` of the set made with `seed`: geometry, findings, vessels, candidates.

    Depends only on its arguments (not on how many CTs the set has). No voxels are made.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0]))
    series_uid = _make_uid(np.random.default_rng(np.random.SeedSequence([seed, index, 2])))
    spacing, origin_xyz, extent = _plan_geometry(rng, index, size, slices, direction)
    pad_hu = int(rng.choice([-3024, -2000], p=[0.6, 0.4]))
    noise_hu = float(rng.uniform(20.0, 40.0))
    vessel_hu = float(rng.uniform(20.0, 60.0))
    anatomy = _plan_anatomy(rng, size * spacing[0], size * spacing[1], slices * spacing[2])
    lung_semi_mm = anatomy.lung_sx * anatomy.body_a
    # Nodules keep their size in mm, but must fit in the lungs of a small field of view.
    max_diameter = max(1.0, min(0.8 * lung_semi_mm, 0.4 * (anatomy.lung_z_hi - anatomy.lung_z_lo)))
    placer = _Placer(rng, anatomy, extent)
    nodules = _plan_nodules(rng, placer, _nodule_count(rng, index, nodules_per_ct), max_diameter, easy)
    excluded = _plan_excluded(rng, placer, max_diameter)
    vessels = _plan_vessels(rng, anatomy, lung_semi_mm)
    local_mm, kinds = _plan_candidates(rng, placer, nodules, excluded, vessels, candidates_per_ct, easy)

    # World coordinates from SimpleITK, for the image exactly as it will be written.
    image = _reference_image(spacing, origin_xyz, DIRECTIONS[direction])

    def located(finding: Finding) -> Finding:
        xyz = _to_world(image, np.array([finding.center_mm]), spacing)[0]
        return dataclasses.replace(finding, center_xyz=tuple(map(float, xyz)))

    return CtPlan(
        index=index,
        seed=seed,
        series_uid=series_uid,
        subset=index % NUM_SUBSETS,
        shape_irc=(slices, size, size),
        spacing_xyz=spacing,
        origin_xyz=origin_xyz,
        direction=DIRECTIONS[direction],
        pad_hu=pad_hu,
        noise_hu=noise_hu,
        vessel_hu=vessel_hu,
        anatomy=anatomy,
        nodules=tuple(map(located, nodules)),
        excluded=tuple(map(located, excluded)),
        vessels=vessels,
        candidate_xyz=_to_world(image, local_mm, spacing),
        candidate_class=np.array([k == KIND_NODULE for k in kinds], dtype=np.int8),
        candidate_kind=tuple(kinds),
    )


def plan_dataset(
    *,
    num_cts: int = DEFAULT_NUM_CTS,
    size: int = DEFAULT_SIZE,
    slices: int = DEFAULT_SLICES,
    candidates_per_ct: int = DEFAULT_CANDIDATES_PER_CT,
    nodules_per_ct: float = DEFAULT_NODULES_PER_CT,
    seed: int = 0,
    direction: str = "identity",
    easy: bool = False,
) -> tuple[CtPlan, ...]:
    """Plan a whole set without making voxels (fast: what `generate` would write, minus the CTs)."""
    check_settings(
        num_cts=num_cts,
        size=size,
        slices=slices,
        candidates_per_ct=candidates_per_ct,
        nodules_per_ct=nodules_per_ct,
        seed=seed,
        direction=direction,
    )
    plans = tuple(
        plan_ct(
            k,
            size=size,
            slices=slices,
            candidates_per_ct=candidates_per_ct,
            nodules_per_ct=nodules_per_ct,
            seed=seed,
            direction=direction,
            easy=easy,
        )
        for k in range(num_cts)
    )
    uids = {p.series_uid for p in plans}
    assert len(uids) == len(plans), "series uid collision (30 random digits): change the seed"
    return plans


# ---------------------------------------------------------------------------------- malignancy

# The readers' malignancy ratings of a nodule (annotations_with_malignancy.csv) follow a latent
# suspicion score made of what the CT shows, plus noise the CT does not show:
#
#     z = MAL_BASE + MAL_DIAMETER_WEIGHT · ln(diameter_mm / 6 mm) + MAL_KIND_OFFSET[kind]
#         + MAL_IRREGULARITY_WEIGHT · irregularity / MAX_LOBULATION + N(0, MAL_NODULE_SD²)
#
# irregularity = Σ|lobes|, the lobulation amplitude (0..MAX_LOBULATION = 0.12). Each of 3 or 4
# readers (MAL_READERS) rates clip(rint(3 + z + N(0, MAL_READER_SD²)), 1, 5); mal_bool = at least
# MAL_MIN_HIGH_RATINGS ratings of MAL_HIGH_RATING or more (the book's real file's rule).
# With the defaults about 40 % of nodules are malignant (1,585 nodules of 8 seeds × 150 CTs:
# 39.1 %); the best threshold on the visible part of z (`visible_suspicion`) gets 79 % of the
# labels right, size alone 74 %, always "benign" 60 %; the rest is per-nodule and reader noise.
MAL_BASE = -0.55  # with the nodule sizes of `_nodule_diameter`, about 40 % malignant
MAL_DIAMETER_WEIGHT = 1.5  # per unit of ln(diameter / 6 mm): 12 mm adds 1.04, 4 mm takes 0.61 off
MAL_KIND_OFFSET = {"part-solid": 0.7, "solid": 0.0, "ground-glass": -0.8}
MAL_IRREGULARITY_WEIGHT = 0.8  # at the largest lobulation amplitude
MAL_NODULE_SD = 0.5  # what the readers see and the CT does not show (history, growth, ...)
MAL_READER_SD = 0.7  # one reader's disagreement with the others
MAL_READERS = ((3, 4), (0.25, 0.75))  # number of readers and their probabilities
MAL_HIGH_RATING, MAL_MIN_HIGH_RATINGS = 4, 2
_MALIGNANCY_STREAM = 3  # SeedSequence([seed, index, 3]): 0 plans the CT, 1 its noise, 2 its uid


@dataclasses.dataclass(frozen=True)
class Malignancy:
    """One nodule's row of annotations_with_malignancy.csv (beyond its annotation).

    ratings: per-reader malignancy 1..5 (LIDC's scale); suspicion: the latent score z (see above)
    without the reader noise. bbox_low_xyz, bbox_high_xyz: world mm, the nodule's lobulated outer
    surface (low ≤ high per axis).
    """

    ratings: tuple[int, ...]
    suspicion: float
    bbox_low_xyz: tuple[float, float, float]
    bbox_high_xyz: tuple[float, float, float]

    @property
    def mal_bool(self) -> bool:
        return sum(r >= MAL_HIGH_RATING for r in self.ratings) >= MAL_MIN_HIGH_RATINGS


def visible_suspicion(finding: Finding) -> float:
    """The part of the suspicion score z that the CT shows: size, kind and lobulation of the nodule."""
    irregularity = float(np.abs(finding.lobes).sum())
    return (
        MAL_BASE
        + MAL_DIAMETER_WEIGHT * math.log(finding.diameter_mm / 6.0)
        + MAL_KIND_OFFSET[finding.kind]
        + MAL_IRREGULARITY_WEIGHT * irregularity / MAX_LOBULATION
    )


@functools.cache
def _sphere_directions(count: int = 2000) -> np.ndarray:
    """(count, 3) unit vectors spread evenly over the sphere (a Fibonacci lattice)."""
    k = np.arange(count) + 0.5
    z = 1.0 - 2.0 * k / count
    phi = np.pi * (1.0 + 5**0.5) * k
    rho = np.sqrt(1.0 - z**2)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def _bounding_box(finding: Finding, direction: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """World-mm (low (3,), high (3,)) box of the finding's lobulated surface, as `_finding_shape` draws it."""
    u = _sphere_directions()
    shape = _lobulation(finding.lobes, u[:, 0], u[:, 1], u[:, 2])
    local = u * (finding.diameter_mm / 2 * shape)[:, None]  # local-mm offsets from the centre
    world = local @ np.array(direction).reshape(3, 3).T + np.array(finding.center_xyz)
    return world.min(axis=0), world.max(axis=0)


def plan_malignancy(plan: CtPlan) -> tuple[Malignancy, ...]:
    """The readers' malignancy ratings and bounding box of each of the plan's nodules, in order.

    Drawn from the CT's own stream SeedSequence([seed, index, 3]), never from the one that plans the
    CT, so the voxels and the other CSVs do not depend on it; the same plan gives the same rows.
    """
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, plan.index, _MALIGNANCY_STREAM]))
    counts, weights = MAL_READERS
    rows = []
    for nodule in plan.nodules:
        # A fixed number of draws per nodule: a nodule's ratings depend only on its place in the CT.
        suspicion = visible_suspicion(nodule) + float(rng.normal(0.0, MAL_NODULE_SD))
        readers = int(rng.choice(counts, p=weights))
        noise = rng.normal(0.0, MAL_READER_SD, size=max(counts))[:readers]
        ratings = np.clip(np.rint(3.0 + suspicion + noise), 1, 5).astype(int)
        low, high = _bounding_box(nodule, plan.direction)
        rows.append(
            Malignancy(
                ratings=tuple(int(r) for r in ratings),
                suspicion=suspicion,
                bbox_low_xyz=tuple(map(float, low)),
                bbox_high_xyz=tuple(map(float, high)),
            )
        )
    return tuple(rows)


# ----------------------------------------------------------------------------------- rendering


def _box(center_mm: np.ndarray, reach_mm: np.ndarray, spacing: np.ndarray, shape_xyz: np.ndarray):
    lo = np.maximum(np.floor((center_mm - reach_mm) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((center_mm + reach_mm) / spacing).astype(int) + 1, shape_xyz)
    if (hi <= lo).any():
        return None
    axes = [(np.arange(lo[k], hi[k], dtype=np.float32) * np.float32(spacing[k])) for k in range(3)]
    region = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    return region, axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]


def _draw_vessel(alpha_out: np.ndarray, segment: np.ndarray, spacing: np.ndarray, shape_xyz) -> None:
    """Raise alpha_out (I, R, C) float32 to one tapering vessel piece's weight where it is higher.

    segment: (8,) [x0, y0, z0, x1, y1, z1, r0, r1] local mm. Taking the maximum over pieces (not
    compositing them one after the other) keeps joints and forks, where pieces overlap, no brighter
    than the vessels they join.

    The soft edge widens with the voxel extent along the radial direction (`_edge`); near the axis,
    where that direction is undefined, it tends to the mean over the directions across the vessel.
    Thin vessels keep their mass (`_thin_factor`).
    """
    p0, p1, r0, r1 = segment[:3], segment[3:6], float(segment[6]), float(segment[7])
    reach = max(r0, r1) + _EDGE_MM + float(spacing.max())
    centre, half = (p0 + p1) / 2, np.abs(p1 - p0) / 2 + reach
    box = _box(centre, half, spacing, shape_xyz)
    if box is None:
        return
    region, x, y, z = box
    d = (p1 - p0).astype(np.float32)
    length2 = float(d.dot(d)) or 1e-6
    px, py, pz = x - np.float32(p0[0]), y - np.float32(p0[1]), z - np.float32(p0[2])
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / np.float32(length2), 0.0, 1.0)
    ex, ey, ez = px - t * d[0], py - t * d[1], pz - t * d[2]
    dist2 = ex**2 + ey**2 + ez**2
    # (n·s)² with n the radial unit vector, blended within ~0.5 mm of the axis into its mean over
    # the circle across the vessel: Σ s_k² (1 - u_k²) / 2 with u the axis direction.
    s2 = (spacing.astype(np.float32)) ** 2
    u2 = (d * d) / np.float32(length2)
    mean_ns2 = np.float32(0.5 * float((s2 * (1.0 - u2)).sum()))
    eps2 = np.float32(0.25)
    ns2 = (ex**2 * s2[0] + ey**2 * s2[1] + ez**2 * s2[2] + eps2 * mean_ns2) / (dist2 + eps2)
    edge = np.sqrt(np.float32(_EDGE_MM**2) + ns2)
    radius = np.float32(r0) + t * np.float32(r1 - r0)
    alpha = _soft(np.sqrt(dist2) - radius, edge) * _thin_factor(radius, edge)
    sub = alpha_out[region]
    np.maximum(sub, alpha, out=sub)


def _draw_vessels(hu: np.ndarray, vessels: np.ndarray, value: float, spacing: np.ndarray, shape_xyz) -> None:
    """Blend the vessel pieces (V, 8) (see `_draw_vessel`) of density `value` HU into hu (I, R, C) float32."""
    alpha = np.zeros_like(hu)
    for segment in vessels:
        _draw_vessel(alpha, segment, spacing, shape_xyz)
    np.maximum(hu, hu + (np.float32(value) - hu) * alpha, out=hu)


def _finding_shape(finding: Finding, spacing: np.ndarray, shape_xyz, with_edge: bool = False):
    """A finding's box and, per voxel in it, distance from the centre and the surface's radius factor.

    Returns None when the box misses the volume, else (region, dist, shape): region, the box's
    slices (index, row, col); dist, (i, r, c) float32 mm from the centre; shape, (i, r, c) float32
    lobulation factor (0.88..1.12) in the voxel's direction: the surface lies at radius × shape.
    with_edge: also edge, (i, r, c) float32 mm, the soft-edge width along the radial direction (`_edge`).
    """
    radius = finding.diameter_mm / 2
    c = np.array(finding.center_mm)
    box = _box(c, np.full(3, radius * 1.15 + _EDGE_MM + float(spacing.max())), spacing, shape_xyz)
    if box is None:
        return None
    region, x, y, z = box
    dx, dy, dz = x - np.float32(c[0]), y - np.float32(c[1]), z - np.float32(c[2])
    dist = np.sqrt(dx**2 + dy**2 + dz**2)
    inv = 1.0 / np.maximum(dist, np.float32(1e-3))
    ux, uy, uz = dx * inv, dy * inv, dz * inv
    shape = _lobulation([np.float32(v) for v in finding.lobes], ux, uy, uz)
    if not with_edge:
        return region, dist, shape
    sx, sy, sz = (np.float32(v) for v in spacing)
    return region, dist, shape, _edge(ux * sx, uy * sy, uz * sz)


def _lobulation(k, ux, uy, uz):
    """Radius factor of a finding with lobe coefficients k (5,) in the unit directions (ux, uy, uz)."""
    return 1.0 + k[0] * (ux**2 - uy**2) + k[1] * ux * uy + k[2] * ux * uz + k[3] * uy * uz + k[4] * (1.5 * uz**2 - 0.5)


def _draw_finding(hu: np.ndarray, finding: Finding, spacing: np.ndarray, shape_xyz) -> None:
    found = _finding_shape(finding, spacing, shape_xyz, with_edge=True)
    if found is None:
        return
    region, dist, shape, edge = found
    radius = finding.diameter_mm / 2
    sub = hu[region]
    alpha = _soft(dist - np.float32(radius) * shape, edge)
    np.maximum(sub, sub + (np.float32(finding.hu) - sub) * alpha, out=sub)
    if finding.core_fraction > 0:
        alpha = _soft(dist - np.float32(radius * finding.core_fraction) * shape, edge)
        np.maximum(sub, sub + (np.float32(finding.core_hu) - sub) * alpha, out=sub)


def _noise_filter(spacing_xy: float):
    """The in-plane filter that gives white noise a CT kernel's texture, and its gain.

    A Gaussian of sd _NOISE_GRAIN_MM within each slice: grains about a millimetre wide, correlated
    between neighbouring pixels and independent between slices, as a reconstruction kernel makes
    them (a band-pass would be closer to filtered back-projection but costs another pass over the
    volume). Returns (filter(noise (I, R, C) float32) -> same, gain): the filtered noise's sd per
    unit input sd, exact away from the borders (the root of the impulse response's sum of squares).
    """
    sigma = _NOISE_GRAIN_MM / spacing_xy

    def apply(noise):
        return ndimage.gaussian_filter(noise, (0.0, sigma, sigma), mode="reflect", truncate=3.0)

    half = math.ceil(3.0 * sigma) + 1
    delta = np.zeros((1, 2 * half + 1, 2 * half + 1), dtype=np.float32)
    delta[0, half, half] = 1.0
    response = apply(delta).astype(np.float64)
    return apply, float(np.sqrt((response**2).sum()))


def render_ct(plan: CtPlan, noise: bool = True) -> np.ndarray:
    """The CT's voxels: (slices, rows, cols) int16 HU, deterministic for the plan.

    noise: add the plan's noise (noise_hu sd, `_noise_filter`'s texture); False gives the
    noise-free anatomy (still rounded, clipped and padded), for tests and pictures.
    """
    anatomy = plan.anatomy
    spacing = np.array(plan.spacing_xyz)
    n_i, n_r, n_c = plan.shape_irc
    shape_xyz = np.array([n_c, n_r, n_i])
    x = (np.arange(n_c, dtype=np.float32) * np.float32(spacing[0]))[None, None, :]
    y = (np.arange(n_r, dtype=np.float32) * np.float32(spacing[1]))[None, :, None]
    z_all = np.arange(n_i, dtype=np.float32) * np.float32(spacing[2])
    hu = np.empty(plan.shape_irc, dtype=np.float32)
    slab = max(1, 2_000_000 // (n_r * n_c))
    for start in range(0, n_i, slab):
        hu[start : start + slab] = anatomy.background_hu(x, y, z_all[start : start + slab, None, None], spacing)
    _draw_vessels(hu, plan.vessels, plan.vessel_hu, spacing, shape_xyz)
    for finding in (*plan.nodules, *plan.excluded):
        _draw_finding(hu, finding, spacing, shape_xyz)
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, plan.index, 1]))
    outside = (
        (x - np.float32(anatomy.fov_x)) ** 2 + (y - np.float32(anatomy.fov_y)) ** 2
        > np.float32(anatomy.fov_radius) ** 2
    )[0]
    texture, gain = _noise_filter(float(spacing[0]))
    out = np.empty(plan.shape_irc, dtype=np.int16)
    for start in range(0, n_i, slab):
        part = hu[start : start + slab]
        if noise:
            white = rng.standard_normal(part.shape, dtype=np.float32)
            part += texture(white) * np.float32(plan.noise_hu / gain)
        np.rint(part, out=part)
        np.clip(part, -1024, 3071, out=part)
        part[:, outside] = plan.pad_hu
        out[start : start + slab] = part
    return out


def render_mask(plan: CtPlan) -> np.ndarray:
    """The CT's true nodule labels: (slices, rows, cols) uint8, k + 1 for `plan.nodules[k]`, 0 elsewhere.

    A voxel belongs to a nodule when its centre lies strictly inside the nodule's lobulated outer
    surface (the halo's, for part-solid ones), i.e. where the rendered nodule weight exceeds one
    half. Excluded findings are not labelled. Nodules are placed apart, so labels do not compete;
    should two shapes ever share a voxel, the earlier nodule keeps it.
    """
    spacing = np.array(plan.spacing_xyz)
    n_i, n_r, n_c = plan.shape_irc
    shape_xyz = np.array([n_c, n_r, n_i])
    labels = np.zeros(plan.shape_irc, dtype=np.uint8)
    for k, nodule in enumerate(plan.nodules):
        found = _finding_shape(nodule, spacing, shape_xyz)
        if found is None:
            continue
        region, dist, shape = found
        sub = labels[region]
        sub[(dist < np.float32(nodule.diameter_mm / 2) * shape) & (sub == 0)] = k + 1
    return labels


def _write_image(voxels: np.ndarray, plan: CtPlan, path: Path, what: str) -> int:
    """Write (I, R, C) voxels with the CT's geometry as `path` (.mhd) + .raw; returns bytes written."""
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(plan.spacing_xyz)
    image.SetOrigin(plan.origin_xyz)
    image.SetDirection(plan.direction)
    try:
        sitk.WriteImage(image, str(path), useCompression=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise OSError(f"{path}: could not write the {what} ({first})") from None
    return path.stat().st_size + path.with_suffix(".raw").stat().st_size


def write_ct(plan: CtPlan, out: str | os.PathLike[str], masks: bool = False) -> int:
    """Render the CT and write `<out>/subset<k>/<uid>.mhd` + `.raw` with SimpleITK; returns bytes written.

    masks: also write its true nodule labels (`render_mask`) as `<out>/masks/<uid>.mhd` + `.raw`
    (MET_UCHAR, the CT's size, spacing, origin and direction).
    """
    written = _write_image(render_ct(plan), plan, Path(out) / plan.mhd_name, "CT")
    if masks:
        written += _write_image(render_mask(plan), plan, Path(out) / plan.mask_name, "nodule mask")
    return written


# ------------------------------------------------------------------------------------- the set


@dataclasses.dataclass(frozen=True)
class SynthSummary:
    """What `generate` wrote. series_uids in generation order (CT k is in subset k % 10)."""

    out: Path
    series_uids: tuple[str, ...]
    num_nodules: int
    num_excluded: int
    num_candidates: int
    num_positive: int
    num_malignant: int
    bytes_written: int
    seconds: float
    workers: int
    shape_irc: tuple[int, int, int]
    direction: str
    masks: bool = False

    @property
    def positive_ratio(self) -> float:
        return self.num_positive / self.num_candidates if self.num_candidates else 0.0


def check_settings(*, num_cts, size, slices, candidates_per_ct, nodules_per_ct, seed, direction, workers=None) -> None:
    """Raise SynthConfigError naming the first unusable setting."""

    def integer(name: str, value, lo: int, hi: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise SynthConfigError(f"--{name} {value!r}: expected an integer from {lo} to {hi:,}")

    integer("num-cts", num_cts, 1, 100_000)
    integer("size", size, MIN_SIZE, MAX_SIZE)
    integer("slices", slices, MIN_SLICES, MAX_SLICES)
    integer("candidates-per-ct", candidates_per_ct, 1, MAX_CANDIDATES_PER_CT)
    integer("seed", seed, 0, 2**63 - 1)
    if workers is not None:
        integer("workers", workers, 1, 1024)
    if (
        isinstance(nodules_per_ct, bool)
        or not isinstance(nodules_per_ct, (int, float, np.number))
        or not 0 <= float(nodules_per_ct) <= MAX_NODULES_PER_CT
    ):
        raise SynthConfigError(
            f"--nodules-per-ct {nodules_per_ct!r}: expected a mean number of nodules per CT from 0 to "
            f"{MAX_NODULES_PER_CT} (0 makes a set without nodules)"
        )
    if direction not in DIRECTIONS:
        raise SynthConfigError(f"--direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")


def _prepare_out(out: Path, force: bool, masks: bool = False) -> None:
    if out.exists() and not out.is_dir():
        raise SynthConfigError(f"--out {out}: is a file; expected a folder for the LUNA16 layout")
    masks_dir = out / MASKS_DIR
    if masks and masks_dir.exists() and not masks_dir.is_dir():
        raise SynthConfigError(f"--masks: {masks_dir} is a file; expected a folder for the nodule masks")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            if not force:
                shown = ", ".join(entries[:4]) + (", …" if len(entries) > 4 else "")
                raise SynthConfigError(
                    f"--out {out}: not empty (holds {shown}); pass --force to replace the data set there "
                    f"(its subset*/*.mhd/.raw, {MASKS_DIR}/*.mhd/.raw and CSV files), or choose a new folder"
                )
            for folder in (*out.glob(SUBSET_GLOB), masks_dir):
                if folder.is_dir():
                    for path in (*folder.glob("*.mhd"), *folder.glob("*.raw")):
                        path.unlink()
            # Masks of an old set must not outlive it; an emptied masks/ goes too (no trace without --masks).
            if masks_dir.is_dir() and not any(masks_dir.iterdir()):
                masks_dir.rmdir()
            for name in CSV_FILES:
                (out / name).unlink(missing_ok=True)
    for k in range(NUM_SUBSETS):
        (out / subset_name(k)).mkdir(parents=True, exist_ok=True)
    if masks:
        masks_dir.mkdir(exist_ok=True)


def _number(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _write_text(path: Path, lines: list[str]) -> int:
    data = ("\n".join(lines) + "\n").encode("ascii")
    path.write_bytes(data)
    return len(data)


def write_csvs(plans: Sequence[CtPlan], out: str | os.PathLike[str]) -> int:
    """Write annotations.csv, annotations_excluded.csv, annotations_with_malignancy.csv, candidates.csv,
    seriesuids.csv; returns bytes.

    Rows are grouped by series in series-uid order, as in LUNA16's files; the malignancy file has
    annotations.csv's rows in its order; seriesuids.csv lists the CTs in generation order, one uid
    per line without a header.
    """
    out = Path(out)
    by_uid = sorted(plans, key=lambda p: p.series_uid)

    def finding_rows(attr: str) -> list[str]:
        return [
            ",".join([p.series_uid, *map(_number, f.center_xyz), _number(f.listed_diameter_mm)])
            for p in by_uid
            for f in getattr(p, attr)
        ]

    candidates = [CANDIDATES_HEADER]
    for p in by_uid:
        candidates.extend(
            f"{p.series_uid},{_number(x)},{_number(y)},{_number(z)},{int(c)}"
            for (x, y, z), c in zip(p.candidate_xyz, p.candidate_class, strict=True)
        )
    return (
        _write_text(out / ANNOTATIONS_FILE, [ANNOTATIONS_HEADER, *finding_rows("nodules")])
        + _write_text(out / EXCLUDED_FILE, [ANNOTATIONS_HEADER, *finding_rows("excluded")])
        + _write_text(out / MALIGNANCY_FILE, [MALIGNANCY_HEADER, *malignancy_rows(by_uid)])
        + _write_text(out / CANDIDATES_FILE, candidates)
        + _write_text(out / SERIESUIDS_FILE, [p.series_uid for p in plans])
    )


def malignancy_rows(plans: Sequence[CtPlan]) -> list[str]:
    """annotations_with_malignancy.csv's rows (no header) of the plans' nodules, in the plans' order.

    Centre and diameter as annotations.csv writes them; mal_details quoted ("[4, 2, 4, 2]").
    """
    rows = []
    for plan in plans:
        for nodule, mal in zip(plan.nodules, plan_malignancy(plan), strict=True):
            details = "[" + ", ".join(map(str, mal.ratings)) + "]"
            rows.append(
                ",".join(
                    [
                        plan.series_uid,
                        *map(_number, nodule.center_xyz),
                        _number(nodule.listed_diameter_mm),
                        str(mal.mal_bool),
                        f'"{details}"',
                        *map(_number, (*mal.bbox_low_xyz, *mal.bbox_high_xyz)),
                        str(len(mal.ratings)),
                    ]
                )
            )
    return rows


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def generate(
    out: str | os.PathLike[str],
    *,
    num_cts: int = DEFAULT_NUM_CTS,
    size: int = DEFAULT_SIZE,
    slices: int = DEFAULT_SLICES,
    candidates_per_ct: int = DEFAULT_CANDIDATES_PER_CT,
    nodules_per_ct: float = DEFAULT_NODULES_PER_CT,
    seed: int = 0,
    workers: int | None = None,
    direction: str = "identity",
    force: bool = False,
    easy: bool = False,
    masks: bool = False,
) -> SynthSummary:
    """Write a synthetic LUNA16-layout data set into `out` (see the module docstring).

    num_cts CTs of (slices, size, size) int16 voxels, candidates_per_ct candidates each,
    nodules_per_ct nodules per CT on average (CT k has none when k % 3 == 2, at least one
    otherwise when nodules_per_ct > 0). workers: processes rendering CTs (None: all cores); the
    files do not depend on it. Refuses a non-empty `out` unless force (then replaces the
    subset*/*.mhd/.raw and CSV files there, leaving anything else). easy: solid nodules ≥ 6 mm and
    negatives only in lung tissue, so a classifier learns the set in minutes on a CPU (a check
    that labels, crops and coordinates line up), not a realistic task. masks: also write each CT's
    true nodule labels as `masks/<uid>.mhd` + `.raw` (see `render_mask`; the other files do not
    change). Raises SynthConfigError for unusable settings, OSError when writing fails.
    """
    started = time.perf_counter()
    check_settings(
        num_cts=num_cts,
        size=size,
        slices=slices,
        candidates_per_ct=candidates_per_ct,
        nodules_per_ct=nodules_per_ct,
        seed=seed,
        direction=direction,
        workers=workers,
    )
    out = Path(out)
    _prepare_out(out, force, masks)
    plans = plan_dataset(
        num_cts=num_cts,
        size=size,
        slices=slices,
        candidates_per_ct=candidates_per_ct,
        nodules_per_ct=nodules_per_ct,
        seed=seed,
        direction=direction,
        easy=easy,
    )
    workers = min(workers or _default_workers(), num_cts)
    sizes = _write_cts(plans, out, workers, masks)
    # CSVs last: an interrupted run leaves no candidates.csv, so the pipeline says the set is incomplete.
    total = sum(sizes) + write_csvs(plans, out)
    seconds = time.perf_counter() - started
    summary = _summarize(
        plans, out, total, seconds, workers=workers, shape_irc=(slices, size, size), direction=direction
    )
    return dataclasses.replace(summary, masks=masks)


def _summarize(
    plans: Sequence[CtPlan],
    out: Path,
    bytes_written: int,
    seconds: float,
    *,
    workers: int,
    shape_irc: tuple[int, int, int],
    direction: str,
) -> SynthSummary:
    """The `SynthSummary` of a set written from `plans`: counts of series, findings and candidates."""
    return SynthSummary(
        out=out,
        series_uids=tuple(p.series_uid for p in plans),
        num_nodules=sum(len(p.nodules) for p in plans),
        num_excluded=sum(len(p.excluded) for p in plans),
        num_candidates=sum(len(p.candidate_class) for p in plans),
        num_positive=int(sum(int(p.candidate_class.sum()) for p in plans)),
        num_malignant=sum(m.mal_bool for p in plans for m in plan_malignancy(p)),
        bytes_written=bytes_written,
        seconds=seconds,
        workers=workers,
        shape_irc=shape_irc,
        direction=direction,
    )


def _write_cts(plans: Sequence[CtPlan], out: Path, workers: int, masks: bool = False) -> list[int]:
    """Write every planned CT (and its mask) under `out` with `workers` processes (1: in this one); bytes per CT."""
    if workers == 1:
        return [write_ct(plan, out, masks) for plan in plans]
    # spawn: safe whatever threads the caller runs (torch, SimpleITK); start-up is under a second.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(write_ct, plans, [str(out)] * len(plans), [masks] * len(plans)))


def format_summary(summary: SynthSummary) -> str:
    """A few lines for the terminal."""
    ratio = f"1 in {1 / summary.positive_ratio:,.0f}" if summary.num_positive else "none"
    slices, rows, cols = summary.shape_irc
    return "\n".join(
        [
            f"synthetic LUNA16 set in {summary.out}",
            f"  CTs:         {len(summary.series_uids):,} of {slices}×{rows}×{cols} int16 voxels "
            f"(slices×rows×cols), direction {summary.direction}, in subset0..{NUM_SUBSETS - 1}",
            f"  nodules:     {summary.num_nodules:,} in {ANNOTATIONS_FILE}, "
            f"{summary.num_excluded:,} excluded findings in {EXCLUDED_FILE}",
            f"  malignancy:  {summary.num_malignant:,} of the {summary.num_nodules:,} nodules malignant "
            f"in {MALIGNANCY_FILE}",
            f"  candidates:  {summary.num_candidates:,} in {CANDIDATES_FILE}, "
            f"{summary.num_positive:,} positive ({ratio})",
            *([f"  masks:       true nodule labels in {MASKS_DIR}/<series_uid>.mhd"] if summary.masks else []),
            f"  written:     {summary.bytes_written / 1e6:,.1f} MB in {summary.seconds:.1f} s "
            f"with {summary.workers} worker process{'es' if summary.workers != 1 else ''}",
        ]
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m p2ch.synth",
        formatter_class=DefaultsHelpFormatter,
        description="Write a synthetic data set in LUNA16's layout (subset0..9/*.mhd+.raw, annotations.csv, "
        "annotations_excluded.csv, annotations_with_malignancy.csv, candidates.csv, seriesuids.csv).",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder to write (default: the data root: $P2CH_DATA_ROOT, else data-unversioned/part2/luna)",
    )
    _add_size_arguments(parser)
    _add_generation_arguments(parser)
    _add_switch_arguments(parser)
    return parser


def _add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """--num-cts, --size, --slices, --candidates-per-ct, --nodules-per-ct: how much is written."""
    parser.add_argument(
        "--num-cts", type=int, default=DEFAULT_NUM_CTS, help=f"number of CTs (default: {DEFAULT_NUM_CTS})"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=DEFAULT_SIZE,
        help=f"rows and columns per slice, {MIN_SIZE}..{MAX_SIZE} (default: {DEFAULT_SIZE})",
    )
    parser.add_argument(
        "--slices",
        type=int,
        default=DEFAULT_SLICES,
        help=f"slices per CT, {MIN_SLICES}..{MAX_SLICES} (default: {DEFAULT_SLICES})",
    )
    parser.add_argument(
        "--candidates-per-ct",
        type=int,
        default=DEFAULT_CANDIDATES_PER_CT,
        help=f"candidate rows per CT (default: {DEFAULT_CANDIDATES_PER_CT}, about 1 positive in 400 as in LUNA16)",
    )
    parser.add_argument(
        "--nodules-per-ct",
        type=float,
        default=DEFAULT_NODULES_PER_CT,
        help=f"mean nodules per CT, 0..{MAX_NODULES_PER_CT}; CT k has none when "
        f"k %% 3 == 2 and at least one otherwise (default: {DEFAULT_NODULES_PER_CT}, "
        "as LUNA16)",
    )


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """--seed, --workers, --direction: how the CTs are made."""
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes, one CT per task; the files do not depend on it (default: all cores)",
    )
    parser.add_argument(
        "--direction",
        choices=tuple(DIRECTIONS),
        default="identity",
        help="direction matrix of every CT: identity (LUNA16's), flipped (x and z axes "
        "reversed) or oblique (rotated 15° about z and 8° about x) (default: identity)",
    )


def _add_switch_arguments(parser: argparse.ArgumentParser) -> None:
    """--force, --easy, --masks: on/off switches."""
    parser.add_argument(
        "--force", action="store_true", help="replace the data set in a non-empty --out (default: refuse)"
    )
    parser.add_argument(
        "--easy",
        action="store_true",
        help="solid nodules of 6 mm or more and negatives only in lung tissue (none on "
        "vessels): a set a classifier learns in minutes on a CPU, to check that "
        "labels, crops and coordinates line up; not a realistic task (default: off)",
    )
    parser.add_argument(
        "--masks",
        action="store_true",
        help=f"also write each CT's true nodule masks as {MASKS_DIR}/<series_uid>.mhd + .raw (MET_UCHAR, "
        "the CT's geometry; k+1 for the CT's k-th nodule in annotations.csv order, 0 elsewhere) (default: off)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        out = resolve_data_root(args.out)
        try:
            summary = generate(
                out,
                num_cts=args.num_cts,
                size=args.size,
                slices=args.slices,
                candidates_per_ct=args.candidates_per_ct,
                nodules_per_ct=args.nodules_per_ct,
                seed=args.seed,
                workers=args.workers,
                direction=args.direction,
                force=args.force,
                easy=args.easy,
                masks=args.masks,
            )
        except OSError as exc:  # e.g. a read-only or full disk: the user's to fix
            raise ConfigError(f"cannot write the synthetic set to {out} ({exc}); choose another --out") from None
        print(format_summary(summary))
        return 0

    return run_cli("p2ch.synth", body, "interrupted; rerun with --force to start the set again")


if __name__ == "__main__":
    sys.exit(main())
