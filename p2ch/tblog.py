"""TensorBoard writing for training runs: one writer per mode, the book's folder names and tags.

A run writes to `<runs_dir>/<tb_prefix>/<run_time>-<mode>_<kind>-<comment>` for mode `trn` and
`val` (kind `cls` for the classifier, as the book), so runs of one experiment sit together and
TensorBoard shows training and validation as two runs. A resumed run reopens the same folders
and purges events after the step it resumes from, so a crash never leaves duplicate points.
Only DDP rank 0 writes (`enabled=False` elsewhere makes every call a no-op).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from p2ch.metrics import auc_with_ci, roc_curve
from p2ch.plots import figure_rgb, roc_figure

MODES = ("trn", "val")
HISTOGRAM_BINS = np.linspace(0.0, 1.0, 51)


def run_dir_name(run_time: str, mode: str, kind: str, comment: str) -> str:
    """`<run_time>-<mode>_<kind>-<comment>`, e.g. `2026-11-30_19.10.34-trn_cls-dwlpt`."""
    return f"{run_time}-{mode}_{kind}-{comment}"


class RunWriters:
    """The TensorBoard writers of one training run (opened lazily on first write)."""

    def __init__(
        self,
        runs_dir: str | Path,
        tb_prefix: str,
        run_time: str,
        comment: str,
        *,
        kind: str = "cls",
        purge_step: int | None = None,
        enabled: bool = True,
    ):
        self.root = Path(runs_dir) / tb_prefix
        self.run_time, self.comment, self.kind = run_time, comment, kind
        self.purge_step = purge_step
        self.enabled = enabled
        self._writers: dict[str, SummaryWriter] = {}

    def path(self, mode: str) -> Path:
        return self.root / run_dir_name(self.run_time, mode, self.kind, self.comment)

    def writer(self, mode: str) -> SummaryWriter:
        assert mode in MODES, mode
        if mode not in self._writers:
            self._writers[mode] = SummaryWriter(log_dir=str(self.path(mode)), purge_step=self.purge_step)
        return self._writers[mode]

    def scalars(self, mode: str, values: Mapping[str, Any], step: int) -> None:
        """Every int/float entry of `values` as a scalar under its key."""
        if not self.enabled:
            return
        writer = self.writer(mode)
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, step)

    def score_distribution(self, mode: str, labels: torch.Tensor, prob_pos: torch.Tensor, step: int) -> None:
        """PR curve (`pr`) and histograms of P(positive) for negatives (`is_neg`) and positives (`is_pos`).

        labels: (N,) bool; prob_pos: (N,) float in [0, 1]; any device.
        """
        if not self.enabled or labels.numel() == 0:
            return
        writer = self.writer(mode)
        labels, prob_pos = labels.cpu(), prob_pos.float().cpu()
        writer.add_pr_curve("pr", labels, prob_pos, step)
        if (~labels).any():
            writer.add_histogram("is_neg", prob_pos[~labels], step, bins=HISTOGRAM_BINS)
        if labels.any():
            writer.add_histogram("is_pos", prob_pos[labels], step, bins=HISTOGRAM_BINS)

    def roc_curve(self, mode: str, labels: torch.Tensor, prob_pos: torch.Tensor, step: int) -> None:
        """ROC figure (image `roc`) and its area (scalar `roc/auc`); nothing unless both classes are present.

        labels: (N,) bool; prob_pos: (N,) float; any device. The figure is rendered by Agg and
        written with add_image (add_figure would import pyplot).
        """
        if not self.enabled:
            return
        labels = labels.detach().cpu().to(torch.bool)
        positives = int(labels.sum())
        if positives == 0 or positives == labels.numel():
            return
        prob_pos = prob_pos.detach().float().cpu()
        curve = roc_curve(labels, prob_pos)
        auc = auc_with_ci(labels, prob_pos, bootstrap=0)  # class counts for the legend; no CI per epoch
        fig = roc_figure(curve, auc, title=f"ROC, {mode}, step {step}")
        self.figure(mode, "roc", fig, step)
        self.writer(mode).add_scalar("roc/auc", auc.auc, step)

    def figure(self, mode: str, tag: str, fig: Any, step: int) -> None:
        """A matplotlib Figure (made without pyplot, e.g. by p2ch.plots) as the image `tag`."""
        if self.enabled:
            self.writer(mode).add_image(tag, figure_rgb(fig), step, dataformats="HWC")

    def images(self, mode: str, tag: str, images: torch.Tensor, step: int) -> None:
        """images: (N, 1, H, W) float in [0, 1]."""
        if self.enabled and len(images):
            self.writer(mode).add_images(tag, images, step)

    def hparams(self, config: Mapping[str, Any], metric_tags: tuple[str, ...]) -> None:
        """The run's settings in TensorBoard's HPARAMS tab, with `metric_tags` as its metrics."""
        if not self.enabled:
            return
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        for summary in hparams(flat, {tag: math.nan for tag in metric_tags}):
            self.writer("val").file_writer.add_summary(summary)

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
