"""The cohort HTML report: ``OUTPUT/dmriflow/report.html``.

One self-contained page (CSS inline, figures as base64 PNG, no script and
no external resource) built from what a run leaves in the derivatives tree:

* census and QC table: per subject status, protocol group, mask volume,
  b0 SNR (see :func:`dmriflow.interfaces.stepfiles.b0_noise`), median FA,
  failures with the step and reason (``group/subjects.tsv``);
* per-subject FA and colour-FA (|V1| x FA as RGB) mid-slices, RISH maps per
  shell and order (the exported derivatives);
* harmonization: site effect before/after and anatomy preservation, from the
  evaluation tables of ``dmriflow harmonize fit`` (``group/harmonization_*``
  here, or beside the artefact a run applied);
* image-gradient angle histograms and tests (``group/image_gradient.*``);
* model metrics (``group/models.tsv`` and the metrics of model cards found
  under ``OUTPUT/dmriflow``).

Sections whose inputs are absent are left out. The figures are drawn with
matplotlib's Agg backend and downsampled panels, so a cohort of thousands
stays a page of a few MB (at most :data:`MAX_SUBJECT_PANELS` subjects are
drawn; the table lists all).
"""

from __future__ import annotations

import base64
import html
import io as _bytes_io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dmriflow.interfaces import __version__, codec, io, parallel
from dmriflow.interfaces.bids_names import parse_name, shell_of
from dmriflow.interfaces.harmonize import ARTEFACT_JSON
from dmriflow.interfaces.steps import rish
from dmriflow.interfaces.steps.base import MAP_SUFFIX
from dmriflow.pipelines.derivatives import SERIES_DESC, SERIES_SUFFIX, derivative_file
from dmriflow.interfaces.stepfiles import MAD_TO_SD
from dmriflow.pipelines.methods import METHODS_FILES, methods_html

#: The report's file name under OUTPUT/dmriflow/.
REPORT_FILE = "report.html"
#: Subjects drawn in the map panels (the table lists every subject).
MAX_SUBJECT_PANELS = 48
#: Subjects drawn in each shell's RISH panel.
MAX_RISH_SUBJECTS = 6
#: Rows of a long table shown before it is cut.
MAX_TABLE_ROWS = 200
#: Figure resolution (dots per inch) of the embedded charts.
FIGURE_DPI = 80
#: Map slices are enlarged (nearest neighbour) to about this many pixels across.
PANEL_PIXELS = 140
#: Upper display limit of map colour scales: this percentile of mask values.
DISPLAY_PERCENTILE = 99.0
#: Columns of the QC table: (subjects.tsv column, heading, number format).
QC_COLUMNS = (("subject", "Subject", None), ("status", "Status", None),
              ("protocol", "Protocol", None), ("mask_volume_ml", "Mask (ml)", "{:.0f}"),
              ("b0_snr", "b0 SNR", "{:.1f}"), ("median_fa", "Median FA", "{:.3f}"),
              ("failed_step", "Failed step", None), ("error", "Reason", None),
              ("failed_fit_fraction", "Failed fits", "{:.2%}"),
              ("gradient_check", "Gradient check", None),
              ("outlier_volumes", "Outlier volumes", None))
#: QC numbers judged for outliers within a protocol group, the robust z beyond
#: which a value is flagged (Iglewicz and Hoaglin's 3.5), and the smallest group judged.
QC_JUDGED = ("mask_volume_ml", "b0_snr", "median_fa")
QC_OUTLIER_Z = 3.5
QC_MIN_GROUP = 5
#: Census columns summarised per protocol group: (column, heading, number format).
CENSUS_COLUMNS = (("field_strength_t", "Field (T)", "{:g}"), ("echo_time_ms", "TE (ms)", "{:g}"),
                  ("shells", "Shells (s/mm²)", None), ("directions", "Directions", None),
                  ("n_b0", "b0s", "{:.0f}"), ("voxel_size_mm", "Voxel (mm)", None),
                  ("dims", "Grid", None))
#: Harmonization evaluation tables written by ``harmonize fit`` (group/).
HARMONIZATION_TABLES = ("harmonization_site_effect.tsv", "harmonization_preservation.tsv")
#: Image-gradient group outputs (see pipelines/image_gradient.py).
IMAGE_GRADIENT_TABLE = "image_gradient.tsv"
IMAGE_GRADIENT_FIGURE = "image_gradient_angles.png"
#: Model metrics: a group table and model cards (models/card.py).
MODELS_TABLE = "models.tsv"
MODEL_CARD = "card.json"

#: Entities of the maps the report draws, and the desc label of a harmonised series.
FA_MAP, V1_MAP = {"model": "tensor", "param": "fa"}, {"model": "tensor", "param": "v1"}
HARMONIZED_DESC = SERIES_DESC["harmonize"]

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;
 color:#1d2433;background:#fff}
header{background:#1d3557;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:24px} header p{margin:4px 0 0;opacity:.85;font-size:13px}
main{padding:8px 28px 40px;max-width:1500px}
h2{border-bottom:2px solid #457b9d;padding-bottom:4px;margin-top:34px}
h3{margin:22px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d5dbe3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{background:#fdecea} tr.missing td{background:#fff6e0}
tr.flagged td{background:#fff3c4}
.status-done{color:#1b7f3b;font-weight:600} .status-failed{color:#b3261e;font-weight:600}
.status-missing{color:#a15c00;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.card{background:#f6f8fb;border:1px solid #d5dbe3;border-radius:6px;padding:10px 16px}
.card b{display:block;font-size:22px}
figure{margin:10px 0} figcaption{font-size:12px;color:#4a5568;max-width:900px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.grid figure{margin:0;border:1px solid #e2e8f0;padding:4px;background:#fafbfc}
.grid figure img{margin-right:3px;vertical-align:bottom}
table.maps td,table.maps th{border:none;padding:2px;text-align:center;font-size:12px}
table.maps tbody th{writing-mode:vertical-rl;transform:rotate(180deg)}
img{max-width:100%;height:auto}
.note{font-size:13px;color:#4a5568;max-width:900px}
"""


# ----------------------------------------------------------------------------
# Reading the derivatives tree
# ----------------------------------------------------------------------------
@dataclass
class SubjectMaps:
    """The exported maps of one subject that the report draws."""

    subject: str
    fa: Path | None = None
    v1: Path | None = None
    rish: dict = field(default_factory=dict)        # {(shell, order): path}
    harmonized: dict | None = None                  # sidecar of a harmonised series


def _status_rows(root: Path) -> list[dict]:
    """Per-subject status files (derivative lists) under OUTPUT/dmriflow."""
    rows = []
    for path in sorted(root.glob("sub-*/**/*_desc-dmriflow_status.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return rows


def subject_maps(root: Path) -> dict[str, SubjectMaps]:
    """FA, V1, RISH and harmonised-series sidecars of each subject, from its status file."""
    out = {}
    for row in _status_rows(root):
        maps = SubjectMaps(row["subject"])
        for d in row.get("derivatives", []):
            p = derivative_file(d, root.parent)
            if not p.exists():
                continue
            entities, suffix, ext = parse_name(p)
            if suffix == MAP_SUFFIX and FA_MAP.items() <= entities.items():
                maps.fa = p
            elif suffix == MAP_SUFFIX and V1_MAP.items() <= entities.items():
                maps.v1 = p
            elif suffix == MAP_SUFFIX and entities.get("model") == rish.MODEL \
                    and shell_of(entities) is not None:
                order = entities.get("param", "").removeprefix(rish.ORDER_PREFIX)
                if order.isdigit():
                    maps.rish[(shell_of(entities), int(order))] = p
            elif suffix == SERIES_SUFFIX and ext == ".json" and \
                    HARMONIZED_DESC in entities.get("desc", ""):
                maps.harmonized = json.loads(p.read_text())
        out[maps.subject] = maps
    return out


def _read_tsv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path, sep="\t") if path.is_file() else None
    except (OSError, ValueError, pd.errors.ParserError):
        return None


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------
def _plt():
    import matplotlib  # heavy: loaded when a figure is drawn
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def prepare() -> None:
    """Import what drawing the figures needs (matplotlib with its Agg backend,
    pyplot, PIL's image plugins): 0.3-0.4 s that :func:`build_report` would
    otherwise spend first. A run calls this in a thread of its own process while
    its engine works (:func:`dmriflow.pipelines.execution.prepare_beside`)."""
    _plt()
    from PIL import Image
    Image.preinit()


def png_data_uri(fig) -> str:
    """A matplotlib figure as a ``data:image/png;base64`` URI (the figure is closed)."""
    plt = _plt()
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _load_map(path: Path) -> nib.Nifti1Image:
    """A map as a NIfTI image in memory; a ``.nii.gz`` is inflated by
    :func:`codec.inflate` (ISA-L where installed, every gzip trailer checked):
    nibabel's reader inflates through Python's gzip (HCP map: 62 ms instead of 37)."""
    if not codec.is_gzip(path):
        return nib.load(path)
    raw = bytearray()
    try:
        codec.inflate(path, raw.extend)
    except codec.CorruptGzipError as exc:       # say which map (the run logs it)
        raise codec.CorruptGzipError(f"{Path(path).name}: {exc}") from None
    return nib.Nifti1Image.from_bytes(raw)


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A map reoriented to RAS voxel axes, and the axis permutation applied.

    ``perm[i]`` is the RAS axis that the file's voxel axis ``i`` became, so
    vector components can follow (signs do not matter for |V1|).
    """
    img = _load_map(path)
    ornt = nib.orientations.io_orientation(img.affine)
    data = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)
    return data, ornt[:, 0].astype(int)


def _centre(fa: np.ndarray) -> tuple[int, int, int]:
    """Voxel through which the mid-slices are cut: the centre of the FA > 0 region.

    The mean voxel index per axis, from the counts of the region's voxels per
    index along that axis (exact integer sums, so the same float as the mean of
    ``np.argwhere``, without listing the voxels: 7 ms instead of 35 at HCP size)."""
    inside = fa > 0
    n = int(np.count_nonzero(inside))
    if n == 0:
        return tuple(s // 2 for s in fa.shape[:3])
    centre = []
    for axis in range(3):
        counts = inside.sum(axis=tuple(a for a in range(inside.ndim) if a != axis))
        centre.append(int(round(int(counts @ np.arange(counts.size)) / n)))
    return tuple(centre)


def colour_fa(fa: np.ndarray, v1: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """RGB = |V1| x FA (red: left-right, green: anterior-posterior, blue: inferior-superior),
    of a volume or of a slice (``fa``'s shape, vectors along ``v1``'s last axis).

    ``v1`` components are along the file's voxel axes; ``perm`` maps them to
    the RAS axes of the reoriented volume.
    """
    rgb = np.empty(v1.shape[:-1] + (3,), dtype=np.float32)
    for i, axis in enumerate(perm):
        rgb[..., axis] = np.abs(v1[..., i])
    rgb *= np.clip(np.nan_to_num(fa), 0, 1)[..., None]
    return np.clip(np.nan_to_num(rgb), 0, 1)


def _axial(vol: np.ndarray, z: int) -> np.ndarray:
    return np.swapaxes(vol[:, :, z], 0, 1)     # rows: posterior -> anterior (origin lower)


def _coronal(vol: np.ndarray, y: int) -> np.ndarray:
    return np.swapaxes(vol[:, y, :], 0, 1)


def _upscale(img: np.ndarray) -> np.ndarray:
    """Nearest-neighbour enlargement of small slices to about PANEL_PIXELS across."""
    k = max(1, int(round(PANEL_PIXELS / max(img.shape[:2]))))
    return np.repeat(np.repeat(img, k, axis=0), k, axis=1) if k > 1 else img


def slice_png(img: np.ndarray, cmap: str | None = "gray", vmin: float = 0.0,
              vmax: float = 1.0) -> str:
    """A 2D slice (through ``cmap``) or an RGB slice in [0, 1] as a PNG data URI.

    Rows are drawn bottom-up (the slice's first row at the bottom).
    """
    from matplotlib import colormaps  # heavy: loaded when a figure is drawn
    from PIL import Image
    img = np.nan_to_num(np.asarray(img, dtype=np.float32))
    if img.ndim == 2:
        span = vmax - vmin if vmax > vmin else 1.0
        img = colormaps[cmap](np.clip((img - vmin) / span, 0, 1))[..., :3]
    rgb = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)[::-1]
    buf = _bytes_io.BytesIO()
    Image.fromarray(np.ascontiguousarray(_upscale(rgb))).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def subject_panels(maps: SubjectMaps) -> list[tuple[str, str]]:
    """(label, PNG URI) of FA (axial) and colour FA (axial, coronal) mid-slices."""
    if maps.fa is None:
        return []
    fa, _ = _canonical(maps.fa)
    cx, cy, cz = _centre(fa)
    panels = [("FA axial", slice_png(_axial(fa, cz)))]
    if maps.v1 is not None:
        v1, perm = _canonical(maps.v1)     # colour only the two slices drawn
        panels += [("colour FA axial",
                    slice_png(colour_fa(_axial(fa, cz), _axial(v1, cz), perm), None)),
                   ("colour FA coronal",
                    slice_png(colour_fa(_coronal(fa, cy), _coronal(v1, cy), perm), None))]
    return panels


def _rish_slice(path: Path) -> np.ndarray:
    """The axial mid-slice of a RISH map (a copy: the volume is not kept)."""
    vol, _ = _canonical(path)
    return _axial(vol, _centre(vol)[2]).copy()


def rish_panels(shell: float, subjects: list[SubjectMaps]) -> tuple[list[int], list]:
    """Orders and, per subject (at most MAX_RISH_SUBJECTS), mid-slice PNGs of one
    shell's RISH maps (one colour scale per order, shared by the subjects)."""
    rows = [m for m in subjects if any(b == shell for b, _ in m.rish)][:MAX_RISH_SUBJECTS]
    orders = sorted({o for m in rows for b, o in m.rish if b == shell})
    drawn = [(m.subject, o, m.rish[(shell, o)]) for m in rows for o in orders
             if (shell, o) in m.rish]
    slices = dict(zip([(subj, o) for subj, o, _ in drawn],
                      parallel.map_chunks(_rish_slice, [p for _, _, p in drawn],
                                          single_blas=False)))
    vmax = {o: max([float(np.percentile(s[s > 0], DISPLAY_PERCENTILE))
                    for (_, oo), s in slices.items() if oo == o and (s > 0).any()] or [1.0])
            for o in orders}
    return orders, [(m.subject, [slice_png(slices[(m.subject, o)], "magma", 0.0, vmax[o])
                                 if (m.subject, o) in slices else None for o in orders])
                    for m in rows]


def qc_figure(table: pd.DataFrame) -> str | None:
    """Median FA, b0 SNR and mask volume of each done subject, by protocol group."""
    cols = [(c, h) for c, h, _ in QC_COLUMNS if c in ("median_fa", "b0_snr", "mask_volume_ml")
            and c in table.columns]
    done = table[table.get("status", pd.Series(dtype=str)) == "done"]
    if done.empty or not cols:
        return None
    plt = _plt()
    groups = sorted(done["protocol"].astype(str).unique()) if "protocol" in done else ["all"]
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(cols), figsize=(3.4 * len(cols), 2.8), squeeze=False)
    rng = np.random.default_rng(0)      # horizontal jitter only
    for ax, (col, heading) in zip(axes[0], cols):
        for k, g in enumerate(groups):
            vals = pd.to_numeric(done[done["protocol"].astype(str) == g][col]
                                 if "protocol" in done else done[col], errors="coerce").dropna()
            ax.scatter(k + rng.uniform(-0.15, 0.15, vals.size), vals, s=14,
                       color=colours(k % 10), alpha=0.8)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(heading, fontsize=9)
        ax.tick_params(labelsize=8)
    return png_data_uri(fig)


def harmonization_figure(effect: pd.DataFrame) -> str | None:
    """|Cohen's d| between sites before and after harmonization, per metric and shell."""
    need = {"metric", "shell", "d_before", "d_after"}
    if not need <= set(effect.columns) or effect.empty:
        return None
    plt = _plt()
    labels = [m if pd.isna(s) else f"{m} b{float(s):g}"
              for m, s in zip(effect["metric"], effect["shell"])]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(labels) + 1.5), 3.0))
    ax.bar(x - 0.2, np.abs(effect["d_before"]), 0.4, label="before", color="#e76f51")
    ax.bar(x + 0.2, np.abs(effect["d_after"]), 0.4, label="after", color="#2a9d8f")
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("|Cohen's d| (target - reference)", fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("Site effect in white matter", fontsize=9)
    return png_data_uri(fig)


# ----------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------
def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(value, fmt: str | None) -> tuple[str, bool]:
    """Cell text and whether it is a number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", False
    if fmt is not None:
        try:
            v = float(value)
            return ("n/a" if not math.isfinite(v) else fmt.format(v)), True
        except (TypeError, ValueError):
            pass
    return str(value), False


def html_table(df: pd.DataFrame, columns=None, row_class=None, max_rows=MAX_TABLE_ROWS) -> str:
    """An escaped HTML table; ``columns``: (column, heading, format) triples."""
    columns = columns or [(c, c, "{:.4g}" if pd.api.types.is_float_dtype(df[c]) else None)
                          for c in df.columns]
    columns = [c for c in columns if c[0] in df.columns]
    head = "".join(f"<th>{_e(h)}</th>" for _, h, _ in columns)
    body = []
    for rec in df.head(max_rows).to_dict("records"):
        cells = []
        for col, _, fmt in columns:
            text, numeric = _fmt(rec.get(col), fmt)
            if col == "status":
                cells.append(f'<td class="status-{_e(text)}">{_e(text)}</td>')
            else:
                cells.append(f'<td class="num">{_e(text)}</td>' if numeric
                             else f"<td>{_e(text)}</td>")
        cls = f' class="{_e(row_class(rec))}"' if row_class else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    more = (f'<p class="note">{len(df) - max_rows} more row(s) not shown.</p>'
            if len(df) > max_rows else "")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _figure(uri: str | None, caption: str, alt: str, key: str | None = None) -> str:
    if uri is None:
        return ""
    keyed = f' data-key="{key}"' if key else ""
    return (f'<figure{keyed}><img src="{uri}" alt="{_e(alt)}"><figcaption>{_e(caption)}'
            f"</figcaption></figure>")


#: A figure of the page marked with the key of what it shows (:func:`figure_key`): the
#: next report reuses its picture when that is unchanged (drawing one costs matplotlib's
#: import and a render, about 1 s of a cached rerun).
KEYED_FIGURE = re.compile(r'<figure data-key="([0-9a-f]{40})"><img '
                          r'src="(data:image/png;base64,[A-Za-z0-9+/]+={0,2})"')


def figure_key(name: str, data: pd.DataFrame) -> str:
    """Key of a figure: its name, the code (pipeline version) and the table it is drawn from."""
    text = f"{name}\0{io.pipeline_version()}\0" + data.to_csv(index=False)
    return blake2b(text.encode(), digest_size=20).hexdigest()


def previous_figures(page: Path) -> dict[str, str]:
    """``{key: picture}`` of the keyed figures of an earlier report page."""
    try:
        return dict(KEYED_FIGURE.findall(page.read_text()))
    except (OSError, UnicodeDecodeError):
        return {}


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>' if body else ""


def census_section(table: pd.DataFrame | None, census: pd.DataFrame | None) -> str:
    src = table if table is not None and "protocol" in table.columns else census
    if src is None or "protocol" not in src.columns:
        return ""
    cols = [c for c, _, _ in CENSUS_COLUMNS if c in src.columns]
    grouped = (src.groupby("protocol", dropna=False)
               .agg(subjects=("subject", "count"), **{c: (c, "first") for c in cols})
               .reset_index())
    note = ('<p class="note">Protocol groups share field strength, shells, directions per '
            "shell, voxel size and echo time (the acquisition census); unreadable: inputs "
            "whose header or gradients could not be read.</p>")
    columns = (("protocol", "Protocol", None), ("subjects", "Subjects", "{:.0f}")) + \
        CENSUS_COLUMNS
    return note + html_table(grouped, columns)


def qc_flags(table: pd.DataFrame) -> pd.Series:
    """Per subject, the QC numbers that are outliers within its protocol group.

    Robust z = (x - group median) / (1.4826 MAD) of mask volume, b0 SNR and
    median FA over the group's done subjects; |z| > QC_OUTLIER_Z is flagged
    ("b0 SNR low (z -5.1)"). Groups with fewer than QC_MIN_GROUP done subjects,
    or no spread, are not judged.
    """
    flags = pd.Series("", index=table.index, dtype=object)
    if "status" not in table.columns:
        return flags
    done = table[table["status"] == "done"]
    groups = done.groupby("protocol") if "protocol" in done.columns else [("all", done)]
    for _, grp in groups:
        if len(grp) < QC_MIN_GROUP:
            continue
        for col, heading, _ in QC_COLUMNS:
            if col not in QC_JUDGED or col not in grp.columns:
                continue
            x = pd.to_numeric(grp[col], errors="coerce")
            mad = float((x - x.median()).abs().median())
            if not mad > 0:
                continue
            z = (x - x.median()) / (MAD_TO_SD * mad)
            for i in z.index[z.abs() > QC_OUTLIER_Z]:
                word = "high" if z[i] > 0 else "low"
                flags[i] = "; ".join(f for f in (flags[i], f"{heading} {word} (z {z[i]:+.1f})")
                                     if f)
    return flags


def qc_section(table: pd.DataFrame, previous: dict | None = None) -> str:
    """Status cards, the QC table and figure (``previous``: :func:`previous_figures`)."""
    counts = table["status"].value_counts().to_dict() if "status" in table else {}
    absolute = (table["qc_flags"].astype(object).fillna("").astype(str) if "qc_flags" in table
                else pd.Series("", index=table.index, dtype=object))
    table = table.assign(qc_flags=absolute, group_flags=qc_flags(table))
    n_flagged = int((table["group_flags"] != "").sum())
    n_absolute = int(((table["qc_flags"] != "") & (table.get("status") == "done")).sum())
    cards = "".join(f'<div class="card"><b>{n}</b>{_e(s)}</div>'
                    for s, n in sorted(counts.items()))
    cards += f'<div class="card"><b>{n_absolute}</b>done with QC flags</div>'
    cards += f'<div class="card"><b>{n_flagged}</b>QC outlier(s)</div>'
    note = ('<p class="note"><b>b0 SNR</b> = mean b0 signal in the brain mask / noise sigma; '
            "sigma = 1.4826 &times; MAD of the differences of consecutive b0 volumes in the "
            "mask / &radic;2 (motion between b0s lowers it). <b>Mask</b>: brain-mask volume. "
            "<b>Median FA</b>: in the brain mask, over the voxels whose fit succeeded. "
            "<b>QC flags</b>: each subject judged on its own (gradient orientation, outlier "
            "volumes, failed tensor fits, mask, b0 SNR; thresholds in every sidecar). "
            "<b>Group outliers</b>: values more than "
            f"{QC_OUTLIER_Z:g} robust SDs (1.4826 &times; MAD) from their protocol group's "
            f"median (groups of at least {QC_MIN_GROUP} done subjects).</p>")
    rows = html_table(table, QC_COLUMNS + (("qc_flags", "QC flags", None),
                                           ("group_flags", "Group outliers", None)),
                      row_class=lambda r: "flagged" if (r.get("qc_flags") or
                                                        r.get("group_flags")) and
                      r.get("status") == "done" else str(r.get("status", "")),
                      max_rows=max(MAX_TABLE_ROWS, len(table)))
    key = figure_key("qc", table)
    fig = _figure((previous or {}).get(key) or qc_figure(table),
                  "Per-subject QC figures by protocol group (done subjects).", "QC scatter", key)
    return f'<div class="cards">{cards}</div>{note}{rows}{fig}'


def maps_section(maps: dict[str, SubjectMaps], order: list[str]) -> str:
    drawn = [maps[s] for s in order if s in maps and maps[s].fa is not None]
    figs = []
    shown = drawn[:MAX_SUBJECT_PANELS]
    # subjects read and drawn on worker threads (inflating, numpy and PNG release the GIL)
    for m, panels in zip(shown, parallel.map_chunks(subject_panels, shown, single_blas=False)):
        imgs = "".join(f'<img src="{uri}" alt="{_e(label)} of {_e(m.subject)}" '
                       f'title="{_e(label)}">' for label, uri in panels)
        figs.append(f"<figure>{imgs}<figcaption>{_e(m.subject)}</figcaption></figure>")
    if not figs:
        return ""
    note = ('<p class="note">Per subject: FA (axial), colour FA (axial, coronal), mid-slices '
            "through the centre of the brain in neurological view (the subject's left on the "
            "image's left). Colour FA: red left-right, green anterior-posterior, blue "
            "inferior-superior, brightness FA.")
    if len(drawn) > MAX_SUBJECT_PANELS:
        note += f" First {MAX_SUBJECT_PANELS} of {len(drawn)} subjects shown."
    return note + "</p>" + f'<div class="grid">{"".join(figs)}</div>'


def rish_section(maps: dict[str, SubjectMaps], order: list[str]) -> str:
    subjects = [maps[s] for s in order if s in maps]
    parts = []
    for b in sorted({b for m in subjects for b, _ in m.rish}):
        orders, rows = rish_panels(b, subjects)
        head = "".join(f"<th>l = {o}</th>" for o in orders)
        body = "".join(
            f"<tr><th>{_e(subj)}</th>" + "".join(
                f'<td><img src="{uri}" alt="RISH b={b:g} l={o} of {_e(subj)}"></td>'
                if uri else "<td></td>" for o, uri in zip(orders, uris)) + "</tr>"
            for subj, uris in rows)
        parts.append(f"<h3>b = {b:g} s/mm&sup2;</h3><table class=\"maps\"><thead><tr><th></th>"
                     f"{head}</tr></thead><tbody>{body}</tbody></table>")
    if not parts:
        return ""
    return ('<p class="note">Rotation-invariant SH features (RISH) of the b0-normalised signal '
            "of each shell, mid axial slice; one colour scale per order, shared by the "
            f"subjects (up to {MAX_RISH_SUBJECTS} shown).</p>" + "".join(parts))


def artefact_rows(root: Path) -> pd.DataFrame | None:
    """One row per harmonization artefact stored under OUTPUT/dmriflow/harmonization."""
    rows = []
    for path in sorted((root / "harmonization").glob(f"*/{ARTEFACT_JSON}")):
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows.append({"artefact": path.parent.name, "reference": meta.get("reference_site"),
                     "target": meta.get("target_site"),
                     "shells": " ".join(f"{float(b):g}" for b in meta.get("shells", [])),
                     "lmax": meta.get("lmax"), "registration": meta.get("registration"),
                     "subjects": len(meta.get("subjects", []))})
    return pd.DataFrame(rows) if rows else None


def harmonization_section(root: Path, maps: dict[str, SubjectMaps]) -> str:
    """Stored artefacts, their fit's evaluation and the subjects a run harmonised."""
    group = root / "group"
    parts = []
    stored = artefact_rows(root)
    if stored is not None:
        parts.append("<h3>Fitted artefacts</h3>" + html_table(stored))
    applied = {m.subject: m.harmonized for m in maps.values() if m.harmonized}
    sources = [group]
    if applied:
        arts = sorted({str(meta.get("HarmonizationArtefact", "")) for meta in applied.values()})
        parts.append(f"<p class=\"note\">{len(applied)} subject(s) harmonised with artefact(s) "
                     f"{', '.join(_e(Path(a).name) for a in arts if a)} before the fits; the "
                     f"maps above are of the harmonised data.</p>")
        # the fit's evaluation tables live in its output's group folder
        # (named relative to this dataset root; absolute in outputs of older versions)
        sources += [(root / a).resolve().parent.parent / "group" for a in arts if a]
    for src in sources:
        effect = _read_tsv(src / HARMONIZATION_TABLES[0])
        if effect is None:
            continue
        pres = _read_tsv(src / HARMONIZATION_TABLES[1])
        where = "" if src == group else \
            f" (from the fit in {_e(os.path.relpath(src.parent.parent, root.resolve()))})"
        parts.append(f"<h3>Site effect before / after{where}</h3>")
        parts.append(_figure(harmonization_figure(effect),
                             "White-matter means compared between the reference and target "
                             "sites (Welch t-test, Cohen's d) before and after applying the "
                             "artefact to the target subjects.", "site effect"))
        parts.append(html_table(effect))
        if pres is not None:
            parts.append("<h3>Anatomy preservation</h3><p class=\"note\">Correlation of each "
                         "target subject's FA map before and after harmonization.</p>")
            parts.append(html_table(pres))
        break
    return "".join(parts)


def image_gradient_section(group: Path) -> str:
    parts = []
    fig = group / IMAGE_GRADIENT_FIGURE
    if fig.is_file():
        parts.append(_figure(file_data_uri(fig), "Angle between the estimated and the "
                             "finite-difference image gradient, against chance.",
                             "image-gradient angle histograms"))
    table = _read_tsv(group / IMAGE_GRADIENT_TABLE)
    if table is not None:
        if "stratum" in table.columns and (table["stratum"] == "all").any():
            parts.append(f'<p class="note">Tests over all evaluated voxels; the per-FA-stratum '
                         f"rows are in group/{IMAGE_GRADIENT_TABLE}.</p>")
            table = table[table["stratum"] == "all"]
        parts.append(html_table(table))
    return "".join(parts)


def models_section(root: Path) -> str:
    parts = []
    table = _read_tsv(root / "group" / MODELS_TABLE)
    if table is not None:
        parts.append(html_table(table))
    for card_path in sorted(root.rglob(MODEL_CARD)):
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        metrics = card.get("metrics") or []
        if not isinstance(card, dict) or not metrics:
            continue
        parts.append(f"<h3>{_e(card.get('name'))} {_e(card.get('version'))}</h3>"
                     f"<p class=\"note\">{_e(card_path.relative_to(root))}</p>")
        parts.append(html_table(pd.DataFrame(metrics)))
    return "".join(parts)


def methods_section(root: Path) -> str:
    """The methods texts under logs/ (a run's methods.md, a harmonization fit's;
    see :mod:`dmriflow.pipelines.methods`)."""
    paths = [root / "logs" / name for name in METHODS_FILES.values()]
    return "".join(methods_html(p.read_text()) for p in paths if p.is_file())


#: The motion table of a corrected series (motion step), and the most series drawn.
MOTION_TABLE_SUFFIX = "_desc-motion_timeseries.tsv"
MAX_MOTION_FIGURES = 24


def _motion_figure(table: pd.DataFrame, threshold: float, title: str) -> str:
    """Translations (mm), rotations (deg) and framewise displacement (mm) against volume."""
    plt = _plt()
    fig, axes = plt.subplots(3, 1, figsize=(7.0, 4.6), sharex=True)
    vol = np.arange(len(table))
    for ax, cols, scale, unit in ((axes[0], ("trans_x", "trans_y", "trans_z"), 1.0, "mm"),
                                  (axes[1], ("rot_x", "rot_y", "rot_z"), 180.0 / np.pi, "deg")):
        for c in cols:
            if c in table:
                ax.plot(vol, pd.to_numeric(table[c], errors="coerce") * scale, lw=1,
                        label=c.split("_")[1])
        ax.set_ylabel(f"{cols[0].split('_')[0]} ({unit})", fontsize=8)
        ax.legend(fontsize=7, ncol=3, loc="upper left", frameon=False)
    fd = pd.to_numeric(table.get("framewise_displacement"), errors="coerce")
    axes[2].plot(vol, fd, color="k", lw=1)
    axes[2].axhline(threshold, color="#b3261e", ls="--", lw=1)
    axes[2].set_ylabel("FD (mm)", fontsize=8)
    axes[2].set_xlabel("volume", fontsize=8)
    axes[0].set_title(title, fontsize=9)
    for ax in axes:
        ax.tick_params(labelsize=7)
    return png_data_uri(fig)


def motion_section(root: Path) -> str:
    """Per corrected series (``--motion-correction``): the traces of its motion table
    and a summary (volumes, mean / max framewise displacement, volumes over the
    threshold the run used, read from the table's sidecar)."""
    from dmriflow.interfaces.steps.motion import DEFAULT_FD_THRESHOLD_MM
    rows, figures = [], []
    for status in _status_rows(root):
        for d in status.get("derivatives", []):
            path = derivative_file(d, root.parent)
            if not path.name.endswith(MOTION_TABLE_SUFFIX) or not path.is_file():
                continue
            table = pd.read_csv(path, sep="\t", na_values=["n/a"])
            sidecar = path.with_name(path.name.removesuffix(".tsv") + ".json")
            try:
                meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
            except (OSError, json.JSONDecodeError):
                meta = {}
            threshold = float((meta.get("Parameters") or {}).get(
                "FramewiseDisplacementThreshold", DEFAULT_FD_THRESHOLD_MM))
            fd = pd.to_numeric(table.get("framewise_displacement"), errors="coerce").fillna(0.0)
            rows.append({"subject": status["subject"], "series": path.name,
                         "volumes": len(table),
                         "fd_mean": float(fd.iloc[1:].mean()) if len(fd) > 1 else 0.0,
                         "fd_max": float(fd.max()), "threshold": threshold,
                         "over": int((fd > threshold).sum())})
            if len(figures) < MAX_MOTION_FIGURES:
                figures.append(_figure(_motion_figure(table, threshold, path.name),
                                       f"{status['subject']}: head motion per volume "
                                       f"(translations, rotations, framewise displacement; "
                                       f"dashed: {threshold:g} mm).",
                                       f"motion traces {status['subject']}"))
    if not rows:
        return ""
    note = ('<p class="note">Motion correction (<code>--motion-correction</code>): each '
            "volume's rigid parameters relative to the first b0 (fMRIPrep's confound columns, "
            "<code>desc-motion_timeseries.tsv</code>) and framewise displacement (Power et al. "
            "2012, 50 mm head radius). The same summary is in the subjects table "
            "(<code>motion_fd_mean</code>, <code>motion_fd_max</code>, "
            "<code>motion_volumes_over_threshold</code>)."
            + (f" Traces of the first {MAX_MOTION_FIGURES} series are drawn."
               if len(rows) > MAX_MOTION_FIGURES else "") + "</p>")
    summary = html_table(pd.DataFrame(rows), (
        ("subject", "Subject", None), ("series", "Motion table", None),
        ("volumes", "Volumes", "{:.0f}"), ("fd_mean", "Mean FD (mm)", "{:.3f}"),
        ("fd_max", "Max FD (mm)", "{:.3f}"), ("threshold", "Threshold (mm)", "{:g}"),
        ("over", "Volumes over", "{:.0f}")), max_rows=max(MAX_TABLE_ROWS, len(rows)))
    return note + summary + '<div class="grid">' + "".join(figures) + "</div>"


def build_report(output_dir) -> str:
    """The report page (HTML text) for ``OUTPUT``; raises if no run is found there."""
    output_dir = Path(output_dir).resolve()
    root = output_dir / "dmriflow"
    group = root / "group"
    table = _read_tsv(group / "subjects.tsv")
    census = _read_tsv(group / "census.tsv")
    has_harmonization = (group / HARMONIZATION_TABLES[0]).is_file()
    if table is None and census is None and not has_harmonization:
        raise FileNotFoundError(f"{root}: no dmriflow results (group/subjects.tsv) found")
    plan = group / "cohort.json"
    meta = json.loads(plan.read_text()) if plan.is_file() else {}
    maps = subject_maps(root)
    order = list(table["subject"]) if table is not None else sorted(maps)
    sections = [
        _section("Cohort census", census_section(table, census), "census"),
        _section("Quality control", qc_section(table, previous_figures(root / REPORT_FILE))
                 if table is not None else "", "qc"),
        _section("Head motion", motion_section(root), "motion"),
        _section("FA and colour FA", maps_section(maps, order), "fa"),
        _section("RISH features", rish_section(maps, order), "rish"),
        _section("Harmonization", harmonization_section(root, maps), "harmonization"),
        _section("Image gradient", image_gradient_section(group), "image-gradient"),
        _section("Models", models_section(root), "models"),
        _section("Methods", methods_section(root), "methods"),
    ]
    facts = [f"{len(table)} subject(s)" if table is not None else "no cohort run",
             f"pipeline {meta['pipeline_version']}" if meta.get("pipeline_version") else "",
             f"worker {meta['worker']}" if meta.get("worker") else "",
             f"run started {meta['started']}" if meta.get("started") else "",
             f"report written {time.strftime('%Y-%m-%d %H:%M:%S')} by dmriflow {__version__}"]
    sub = " &middot; ".join(_e(f) for f in facts if f)
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>dmriflow report: {_e(output_dir.name)}</title><style>{CSS}</style></head>"
            f"<body><header><h1>dmriflow cohort report</h1><p>{_e(output_dir.name)}</p><p>{sub}</p>"
            f"</header><main>{''.join(sections)}</main></body></html>\n")


def write_report(output_dir) -> Path:
    """Write ``OUTPUT/dmriflow/report.html`` (atomically) and return its path."""
    page = build_report(output_dir)
    return io.write_text(page, Path(output_dir).resolve() / "dmriflow" / REPORT_FILE)
