"""p2ch.plots: the ROC figure (object-oriented matplotlib, no pyplot) and atomic PNG writing."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from p2ch import plots
from p2ch.metrics import auc_with_ci, roc_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk that follows the signature."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture()
def roc():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.random(200) + 0.3 * labels, 2)
    return roc_curve(labels, scores), auc_with_ci(labels, scores, bootstrap=100)


def test_roc_figure_draws_curve_diagonal_labels_and_operating_point(roc):
    curve, auc = roc
    fig = plots.roc_figure(curve, auc, title="val", threshold_point=(0.2, 0.7))
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_xlabel() == plots.ROC_X_LABEL and ax.get_ylabel() == plots.ROC_Y_LABEL
    assert ax.get_xlim() == (0.0, 1.0)
    lines = ax.get_lines()
    np.testing.assert_array_equal(lines[0].get_xydata(), [[0, 0], [1, 1]])
    np.testing.assert_array_equal(lines[1].get_xdata(), curve.fpr)
    np.testing.assert_array_equal(lines[1].get_ydata(), curve.tpr)
    np.testing.assert_array_equal(lines[2].get_xydata(), [[0.2, 0.7]])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"AUC {auc.auc:.3f} [{auc.ci_low:.3f}, {auc.ci_high:.3f}]" in legend[1]
    assert f"{auc.positives} positive / {auc.negatives} negative" in legend[1]
    assert ax.get_title() == "val"


def test_roc_figure_without_auc_result_or_point(roc):
    curve, _ = roc
    fig = plots.roc_figure(curve, title="t")
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2
    assert ax.get_legend().get_texts()[1].get_text() == f"AUC {curve.auc:.3f}"


def test_figure_rgb_renders_without_pyplot(roc):
    image = plots.figure_rgb(plots.roc_figure(roc[0], title="t"))
    assert image.shape == (600, 600, 3) and image.dtype == np.uint8
    assert (image == 255).all(axis=2).mean() > 0.5  # mostly white background


def test_plotting_and_tensorboard_logging_never_import_pyplot(tmp_path):
    """pyplot's global state (figure list, GUI backend) stays out, also on the TensorBoard path."""
    script = (
        "import sys, torch\n"
        "from p2ch import plots, metrics, tblog\n"
        "y, p = torch.tensor([True, False, True, False]), torch.tensor([0.9, 0.2, 0.4, 0.6])\n"
        "plots.save_figure_png(plots.roc_figure(metrics.roc_curve(y, p), title='t'), sys.argv[1] + '/roc.png')\n"
        "w = tblog.RunWriters(sys.argv[1], 'p', 't', 'c'); w.roc_curve('val', y, p, 0); w.close()\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=Path(__file__).parents[1])
    assert (tmp_path / "roc.png").exists() and any((tmp_path / "p").iterdir())


def test_save_figure_png_writes_a_png_atomically(tmp_path, roc):
    path = tmp_path / "new" / "folder" / "roc.png"
    plots.save_figure_png(plots.roc_figure(*roc, title="t"), path)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert png_size(data) == (600, 600)
    assert [p.name for p in path.parent.iterdir()] == ["roc.png"]  # no temporary file left behind
