"""One HTML report per `nodule_analysis` run: every CT, its nodules with pictures, the detector's scores.

`write_report` writes `report.html` into the run's output folder: plain HTML and one inline style
sheet, no script, no font or image from the network; pictures and files are linked by relative
paths, so the folder can be moved, zipped or opened offline as it is. A nodule's picture is its row
of the picture sheet (`p2ch.vis.write_sheets`), shown by clipping the sheet (CSS only) and linked to
the whole sheet; nodules beyond `--max-pictures` are listed without one.

Per CT: its uid, source, kind of input, geometry, seconds per step, counts and links to its files
(nodules.csv, components.csv, analysis.json, the label map, …), then its nodules sorted by p_nodule
(the order of nodules.csv; `#` is the label in the label map): p_nodule, p_malignant, diameter,
centre in mm, voxel (index, row, col), slice number and, for DICOM, InstanceNumber. With validation
parts: their CPM, FROC plot and confusion matrix.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from p2ch.fileio import write_text_atomic
from p2ch.vis import sheet_size_px

REPORT_NAME = "report.html"
THUMBNAIL_SCALE = 0.5  # a sheet row of 750 × 295 px is shown at 375 × 148 px

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em 2em; color: #1d1d1f; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
h2.uid { font-size: 1.15em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { padding: 0.2em 0.45em; text-align: right; white-space: nowrap; }
th { background: #f0f0f3; position: sticky; top: 0; } tr:nth-child(even) td { background: #fafafc; }
td.text, th.text { text-align: left; } td.pic { padding: 2px; }
.meta { color: #555; font-size: 0.92em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; }
dt { color: #555; } dd { margin: 0; font-family: ui-monospace, monospace; font-size: 0.92em; }
.crop { display: block; overflow: hidden; } .crop img { display: block; border: 0; }
.malignant { color: #b00020; font-weight: 600; } .none { color: #888; }
.uid { font-family: ui-monospace, monospace; }
"""


@dataclasses.dataclass(frozen=True)
class CtReport:
    """What the report shows of one CT.

    folder: the CT's output folder. summary: its analysis.json. nodules: its nodules.csv rows (most
    probable first). pictures: {label: (sheet file name in `folder`, row on the sheet, 0-based)} of the
    nodules drawn.
    """

    folder: Path
    summary: dict[str, Any]
    nodules: pd.DataFrame
    pictures: dict[int, tuple[str, int]]


@dataclasses.dataclass(frozen=True)
class PartReport:
    """A validation part: its name, folder (froc.png, metrics.json, …), CPM text and confusion matrix
    ({actual: {column: count}}, rows and columns in the order to show)."""

    name: str
    folder: Path
    scans: int
    cpm: str
    confusion: dict[str, dict[str, int]]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _link(target: Path, base: Path) -> str:
    """`target` relative to the report's folder, with / separators, escaped for an attribute."""
    return _e(Path(os.path.relpath(target, base)).as_posix())


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or pd.isna(value):
        return '<span class="none">–</span>'
    return f"{float(value):.{digits}f}"


def _picture(ct: CtReport, label: int, base: Path) -> str:
    if label not in ct.pictures:
        return '<span class="none">not drawn</span>'
    sheet, row = ct.pictures[label]
    width, row_height = sheet_size_px(1)
    shown_w, shown_h = round(width * THUMBNAIL_SCALE), round(row_height * THUMBNAIL_SCALE)
    href = _link(ct.folder / sheet, base)
    return (
        f'<a href="{href}" title="{_e(sheet)}, row {row + 1}"><span class="crop" style="width:{shown_w}px;'
        f'height:{shown_h}px"><img src="{href}" width="{shown_w}" style="margin-top:-{row * shown_h}px" '
        f'alt="nodule {label}: axial, coronal and sagittal planes"></span></a>'
    )


def _nodule_rows(ct: CtReport, base: Path, malignancy_threshold: float, dicom: bool) -> list[str]:
    rows = []
    for nodule in ct.nodules.itertuples(index=False):
        label = int(nodule.label)
        p_mal = nodule.p_malignant
        mal_class = "p-malignant malignant" if pd.notna(p_mal) and p_mal > malignancy_threshold else "p-malignant"
        instance = "" if pd.isna(nodule.instance_number) else str(int(nodule.instance_number))
        rows.append(
            f'<tr class="nodule" data-label="{label}"><td>{label}</td><td class="pic">{_picture(ct, label, base)}</td>'
            f'<td class="p-nodule">{_number(nodule.p_nodule, 3)}</td><td class="{mal_class}">{_number(p_mal, 3)}</td>'
            f"<td>{_number(nodule.diameter_mm, 1)}</td>"
            f'<td class="xyz">{_number(nodule.coordX, 1)}, {_number(nodule.coordY, 1)}, {_number(nodule.coordZ, 1)}'
            f'</td><td class="irc">{int(nodule.voxel_index)}, {int(nodule.voxel_row)}, {int(nodule.voxel_col)}</td>'
            f'<td class="slice">{int(nodule.slice_number)}</td>'
            + (f'<td class="instance">{instance}</td>' if dicom else "")
            + "</tr>"
        )
    return rows


def _nodule_header(dicom: bool) -> str:
    instance = "<th>DICOM<br>Instance</th>" if dicom else ""
    return (
        '<tr><th>#</th><th class="text">picture: axial, coronal, sagittal</th><th>p_nodule</th><th>p_malignant</th>'
        "<th>diameter<br>mm</th><th>x, y, z<br>mm (LPS)</th><th>voxel<br>i, r, c</th>"
        f"<th>slice<br>(1-based)</th>{instance}</tr>"
    )


def _ct_section(ct: CtReport, base: Path, malignancy_threshold: float) -> str:
    s = ct.summary
    geometry = s["ct"]
    counts = s["counts"]
    seconds = ", ".join(f"{step} {value:.1f} s" for step, value in s["seconds"].items())
    files = " · ".join(
        f'<a href="{_link(ct.folder / name, base)}">{_e(name)}</a>' for name in s.get("files", {}).values()
    )
    drawn = len(ct.pictures)
    note = "" if drawn == len(ct.nodules) else f" (pictures of the {drawn} most probable: --max-pictures)"
    items = [
        ("source", f"{_e(s['source'])} ({_e(s.get('source_kind', ''))})"),
        ("size (index, row, col)", " × ".join(map(str, geometry["shape_irc"]))),
        ("voxel size x, y, z mm", ", ".join(f"{v:.4g}" for v in geometry["voxel_size_xyz"])),
        ("origin x, y, z mm", ", ".join(f"{v:.2f}" for v in geometry["origin_xyz"])),
        ("direction", " ".join(f"{round(v, 4) + 0.0:g}" for v in geometry["direction"])),
        ("analysed", f"{_e(s['created'])}; {seconds}"),
        ("components", f"{counts['components']} ({counts['kept_by_size']} kept by size)"),
        ("files", files),
    ]
    body = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in items)
    dicom = s.get("source_kind") == "DICOM"
    table = (
        f'<table class="nodules">{_nodule_header(dicom)}{"".join(_nodule_rows(ct, base, malignancy_threshold, dicom))}'
        "</table>"
        if len(ct.nodules)
        else "<p>No nodule above the threshold.</p>"
    )
    return (
        f'<section class="ct" id="ct-{_e(s["series_uid"])}"><h2 class="uid">{_e(s["series_uid"])}</h2><dl>{body}</dl>'
        f"<h3>{counts['nodules']} nodule(s), {counts['malignant']} malignant{note}</h3>{table}</section>"
    )


def _overview(cts: Sequence[CtReport]) -> str:
    rows = "".join(
        f'<tr><td class="text uid"><a href="#ct-{_e(ct.summary["series_uid"])}">{_e(ct.summary["series_uid"])}</a></td>'
        f'<td class="text">{_e(ct.summary.get("source_kind", ""))}</td><td>{ct.summary["counts"]["nodules"]}</td>'
        f"<td>{ct.summary['counts']['malignant']}</td><td>{sum(ct.summary['seconds'].values()):.1f}</td></tr>"
        for ct in cts
    )
    return (
        '<table class="overview"><tr><th class="text">CT</th><th class="text">input</th><th>nodules</th>'
        f"<th>malignant</th><th>seconds</th></tr>{rows}</table>"
    )


def _part_section(part: PartReport, base: Path) -> str:
    columns = list(next(iter(part.confusion.values())).keys()) if part.confusion else []
    header = "".join(f"<th>{_e(c)}</th>" for c in columns)
    rows = "".join(
        f'<tr><th class="text">{_e(actual)}</th>'
        + "".join(f"<td>{'–' if actual == 'non-nodule' and c == 'complete miss' else counts[c]}</td>" for c in columns)
        + "</tr>"
        for actual, counts in part.confusion.items()
    )
    froc = _link(part.folder / "froc.png", base)
    return (
        f'<section class="part" id="part-{_e(part.name)}"><h2>Whole detector on the {_e(part.name)} series</h2>'
        f"<p>{part.scans} CTs; detection CPM {_e(part.cpm)}. Files: "
        f'<a href="{_link(part.folder / "metrics.json", base)}">metrics.json</a> · '
        f'<a href="{_link(part.folder / "submission.csv", base)}">submission.csv</a></p>'
        f'<a href="{froc}"><img class="froc" src="{froc}" width="560" alt="FROC curve of the {_e(part.name)} series">'
        f'</a><h3>Confusion matrix (the book\'s chapter 14)</h3><table class="confusion"><tr><th class="text">actual'
        f"</th>{header}</tr>{rows}</table></section>"
    )


def write_report(
    out: Path,
    cts: Sequence[CtReport],
    parts: Sequence[PartReport],
    run: dict[str, Any],
) -> Path:
    """Write `out/report.html` (see the module docstring); returns its path.

    run: what the header shows: "time" (str), "models" ({kind: info with "path", "epoch", "sha1"} or None),
    "nodule_threshold", "malignancy_threshold" (floats) and "version" (str).
    """
    cts = [
        dataclasses.replace(ct, nodules=ct.nodules.sort_values("p_nodule", ascending=False, kind="stable"))
        for ct in cts
    ]
    models = "; ".join(
        f"{_e(kind)}: {_e(info['path'])} (epoch {_e(info.get('epoch'))}, sha1 {_e(str(info.get('sha1', ''))[:12])})"
        if info
        else f"{_e(kind)}: none"
        for kind, info in run["models"].items()
    )
    nodules = sum(len(ct.nodules) for ct in cts)
    parts_html = "".join(_part_section(part, out) for part in parts)
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>p2ch nodule analysis {_e(run['time'])}</title><style>{_STYLE}</style></head><body>"
        f'<h1>Nodule analysis</h1><p class="meta">{_e(run["time"])} · p2ch {_e(run["version"])} · '
        f"{len(cts)} CT(s), {nodules} nodule(s) with p_nodule &gt; {run['nodule_threshold']:g} "
        f"(malignant: p_malignant &gt; {run['malignancy_threshold']:g})<br>models: {models}</p>"
        f"{_overview(cts) if cts else ''}{parts_html}"
        + "".join(_ct_section(ct, out, run["malignancy_threshold"]) for ct in cts)
        + "</body></html>\n"
    )
    path = out / REPORT_NAME
    write_text_atomic(path, document)
    return path
