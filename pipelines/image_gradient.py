"""The image-gradient step in the engine (SCIENCE.md section 7).

Per subject, :class:`ImageGradient` runs the one-series estimators of
:mod:`dmriflow.interfaces.image_gradient` with every control and writes
angle maps and tidy rows into its node folder; it returns a *product record*
that :class:`~dmriflow.pipelines.steps.Export` copies into the derivatives
tree. Per cohort, :class:`ImageGradientGroup` writes
``group/image_gradient.tsv`` (one-sample tests against chance and paired
tests against the fibre-only controls, estimators beside controls) and the
figure ``group/image_gradient_angles.png``.

The plain functions (timing resolution, :func:`subject_products`,
:func:`write_group`, :func:`angle_figure`) hold the logic and never touch the
engine; the two Pydra tasks at the end are thin wrappers.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
from pydra.compose import python

from dmriflow.interfaces import io
from dmriflow.interfaces.errors import InputError
from dmriflow.pipelines.steps import STEP_MARKER, guarded, load_series

#: Step name (node marker, failure records, sidecars).
STEP = "image_gradient"
#: Estimators the pipeline runs on one magnitude series. C needs two
#: diffusion times of the same subject and P the phase of complex data: both
#: are study estimators (bench/image_gradient_study.py, interfaces API).
PIPELINE_ESTIMATORS = ("B", "A")
STUDY_ONLY = {"C": "compares two series of the same subject at two diffusion times",
              "P": "fits the phase of complex data, and dmriflow reads magnitude series"}
DEFAULT_ESTIMATORS = ("B",)
#: Sidecar keys read for the sequence timing, in seconds like every BIDS time.
#: BIDS 1.9 has EchoTime but no field for the gradient timing: dmriflow reads
#: these two keys (write them into the DWI JSON sidecar), else the CLI options.
SIDECAR_TIMING_KEYS = {"Delta": "DiffusionGradientSeparation",
                       "delta": "DiffusionGradientDuration", "TE": "EchoTime"}
#: CLI option of each timing field (ms), for error messages.
TIMING_OPTIONS = {"Delta": "--gradient-separation", "delta": "--gradient-duration",
                  "TE": "--echo-time"}
#: BIDS entities of the step's derivatives.
MODEL_ENTITY = "model-imagegradient"
GROUP_TABLE = "image_gradient.tsv"
GROUP_FIGURE = "image_gradient_angles.png"
#: Angle histogram bins (deg) stored per subject and summed for the figure.
HISTOGRAM_BIN_DEG = 2.0


# ----------------------------------------------------------------------------
# Options and timing
# ----------------------------------------------------------------------------
def parse_estimators(text) -> tuple[str, ...]:
    """``"B,A"`` or a sequence -> validated estimator names (order kept)."""
    names = [n.strip().upper() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise ValueError("no image-gradient estimator given (choose from "
                         f"{', '.join(PIPELINE_ESTIMATORS)})")
    for name in names:
        if name in STUDY_ONLY:
            raise ValueError(f"estimator {name} {STUDY_ONLY[name]}: it is not a pipeline step; "
                             f"use the study API (docs/image_gradient.md)")
    unknown = [n for n in names if n not in PIPELINE_ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown image-gradient estimator(s) {unknown}; choose from "
                         f"{', '.join(PIPELINE_ESTIMATORS)}")
    return tuple(dict.fromkeys(names))


def resolve_timing(overrides: dict | None, sidecar: str | None, dwi: str):
    """The subject's :class:`SequenceTiming` (ms): each field from the command
    line when given there, else from the DWI's JSON sidecar (seconds), else
    an :class:`InputError` naming the sidecar (or the DWI when it has none).
    TE is optional (recorded only)."""
    from dmriflow.interfaces.image_gradient import SequenceTiming
    from dmriflow.pipelines.inputs import read_sidecar
    meta = read_sidecar(sidecar) if sidecar else {}
    values, source = {}, {}
    for name, key in SIDECAR_TIMING_KEYS.items():
        given = (overrides or {}).get(name)
        if given is not None:
            values[name], source[name] = float(given), "command line"
        elif meta.get(key) is not None:
            try:
                values[name] = float(meta[key]) * 1000.0
            except (TypeError, ValueError):
                raise InputError(sidecar, f"{key} must be a number in seconds, "
                                          f"got {meta[key]!r}") from None
            source[name] = "sidecar"
    missing = [n for n in ("Delta", "delta") if n not in values]
    if missing:
        keys = " and ".join(SIDECAR_TIMING_KEYS[n] for n in missing)
        opts = " and ".join(TIMING_OPTIONS[n] for n in missing)
        raise InputError(sidecar or dwi,
                         f"the image-gradient step needs the diffusion timing: no {keys} "
                         f"(seconds) in the JSON sidecar and no {opts} (ms) on the command "
                         f"line")
    try:
        return SequenceTiming(values["Delta"], values["delta"],
                              values.get("TE", float("nan"))), source
    except ValueError as exc:
        raise InputError(sidecar or dwi, f"{exc} (from {source})") from None


def entity_label(name: str) -> str:
    """A BIDS label (alphanumeric) for an estimator or control name."""
    return re.sub(r"[^A-Za-z0-9]", "", name)


# ----------------------------------------------------------------------------
# Angle histograms and the figure
# ----------------------------------------------------------------------------
def histogram_edges() -> np.ndarray:
    return np.arange(0.0, 90.0 + HISTOGRAM_BIN_DEG / 2, HISTOGRAM_BIN_DEG)


def angle_histograms(angles: dict[str, np.ndarray], kind: str = "3d") -> list[dict]:
    """Tidy histogram rows (name, kind, bin_lo, bin_hi, count) of acute angles
    (deg) per estimator/control; NaN angles are left out."""
    edges = histogram_edges()
    rows = []
    for name, values in angles.items():
        v = np.asarray(values, dtype=np.float64).ravel()
        counts, _ = np.histogram(v[np.isfinite(v)], bins=edges)
        rows += [{"name": name, "kind": kind, "bin_lo": float(lo), "bin_hi": float(hi),
                  "count": int(c)} for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
    return rows


def chance_density(theta_deg: np.ndarray, kind: str = "3d") -> np.ndarray:
    """Chance density per degree of the acute angle between random axes: 3D
    sin(theta) (pi/180 per degree), 2D (in a plane) uniform 1/90."""
    theta = np.asarray(theta_deg, dtype=np.float64)
    if kind == "2d":
        return np.full_like(theta, 1.0 / 90.0)
    return np.sin(np.radians(theta)) * math.pi / 180.0


def angle_figure(histograms, path, title: str = "") -> Path:
    """Acute-angle histograms (one panel per estimator and control, 3D angles)
    against the chance density sin(theta); written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(histograms)
    df = df[df["kind"] == "3d"]
    names = list(dict.fromkeys(df["name"]))
    if not names:
        raise ValueError("no 3D angle histogram to plot")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    theta = np.linspace(0.0, 90.0, 181)
    for ax, name in zip(axes.ravel(), names):
        h = df[df["name"] == name].groupby(["bin_lo", "bin_hi"], as_index=False)["count"].sum()
        total = h["count"].sum()
        width = (h["bin_hi"] - h["bin_lo"]).to_numpy()
        density = h["count"].to_numpy() / max(total, 1) / width
        centres = 0.5 * (h["bin_lo"] + h["bin_hi"]).to_numpy()
        mean = float(np.sum(centres * h["count"]) / max(total, 1))
        ax.bar(h["bin_lo"], density, width=width, align="edge", color="#4c72b0", alpha=0.75,
               label=f"{name} (mean {mean:.1f})")
        ax.plot(theta, chance_density(theta), "k--", lw=1.2, label="chance sin(theta)")
        ax.set_xlim(0, 90)
        ax.set_title(f"{name}: {total} voxels", fontsize=9)
        ax.set_xlabel("acute angle to the image gradient (deg)", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------
# One subject: files from the evaluation
# ----------------------------------------------------------------------------
def subject_seed(subject: str) -> int:
    """Seed of a subject's random controls (shuffle, surrogate noise,
    perpendicular axis): stable across runs and machines."""
    import zlib
    return zlib.crc32(subject.encode())


def subject_products(data, timing, estimators, out_dir, subject: str,
                     max_voxels: int = 0) -> dict:
    """Evaluate one subject and write its files; return the product record.

    ``data``: an :class:`io.DWI`; ``timing``: a SequenceTiming. Maps (in
    ``out_dir``): per method (estimators, nulls, controls) the acute angle
    (``param-angle``, deg) and the angle in the plane perpendicular to V1
    (``param-angle2d``); per estimator its axis (``param-axis``, FSL image
    frame) and quality; the gold-standard gradient (``desc-goldstandard``,
    1/mm). Tables: the tidy per-subject rows (``desc-summary``) and angle
    histograms (``desc-histogram``). ``row``: mean/median angle of every
    method over all evaluated voxels, for the subject table.
    """
    import pandas as pd
    from dmriflow.interfaces import image_gradient as ig
    out = Path(out_dir)
    ev = ig.evaluate_subject(data, timing, tuple(estimators), subject=subject,
                             rng=subject_seed(subject), max_voxels=max_voxels or None)
    maps = {}

    def save(entities: str, array, name: str) -> None:
        maps[f"{MODEL_ENTITY}_{entities}"] = str(io.save_nifti(
            np.asarray(array, dtype=np.float32), data.affine, out / f"{name}.nii.gz",
            data.header).resolve())

    save("desc-goldstandard_param-gradient", ev.gold.gradient, "gold_gradient")
    for method in ev.angles:
        label = entity_label(method)
        save(f"desc-{label}_param-angle", ev.angles[method], f"angle_{label}")
        save(f"desc-{label}_param-angle2d", ev.angles_2d[method], f"angle2d_{label}")
    for name in estimators:
        fit = ev.fits[name]
        save(f"desc-{entity_label(name)}_param-axis", fit.axis, f"axis_{name}")
        save(f"desc-{entity_label(name)}_param-quality", fit.quality, f"quality_{name}")
    summary = io.write_text(ev.rows.to_csv(sep="\t", index=False, na_rep="n/a"),
                            out / "summary.tsv")
    hist = angle_histograms({m: a[ev.mask] for m, a in ev.angles.items()}, "3d")
    hist += angle_histograms({m: a[ev.mask] for m, a in ev.angles_2d.items()}, "2d")
    histogram = io.write_text(pd.DataFrame(hist).to_csv(sep="\t", index=False),
                              out / "histogram.tsv")
    overall = ev.rows[ev.rows["stratum"] == "all"]
    row = {"imagegradient_voxels": int(ev.mask.sum())}
    for r in overall.itertuples():
        row[f"imagegradient_{r.method}_mean_deg"] = round(float(r.mean), 4)
        row[f"imagegradient_{r.method}_median_deg"] = round(float(r.median), 4)
    params = {**ev.parameters, "estimators": list(estimators),
              "seed": subject_seed(subject), "quality": {n: ev.fits[n].quality_name
                                                         for n in estimators},
              "chance_deg": dict(ig.CHANCE)}
    return {"subject": subject, "status": "ok", "step": STEP, "maps": maps,
            "tables": {f"{MODEL_ENTITY}_desc-summary": str(summary.resolve()),
                       f"{MODEL_ENTITY}_desc-histogram": str(histogram.resolve())},
            "parameters": params, "row": row}


# ----------------------------------------------------------------------------
# The cohort: tests table and figure
# ----------------------------------------------------------------------------
def write_group(products: list[dict], output_dir) -> dict:
    """``group/image_gradient.tsv`` (``cohort_tests``: estimators beside nulls
    and controls, each against chance and paired against the fibre-only
    controls) and ``group/image_gradient_angles.png`` from the subjects'
    product records (failed subjects are left out and counted)."""
    import pandas as pd
    from dmriflow.interfaces import image_gradient as ig
    done = [p for p in products if p and p.get("status") == "ok"]
    group = Path(output_dir, "dmriflow", "group")
    if not done:
        raise ValueError("no subject has image-gradient results")
    key = f"{MODEL_ENTITY}_desc-"
    rows = pd.concat([pd.read_csv(p["tables"][key + "summary"], sep="\t") for p in done],
                     ignore_index=True)
    tests = ig.cohort_tests(rows)
    tests.insert(0, "n_failed_subjects", len(products) - len(done))
    table = io.write_text(tests.to_csv(sep="\t", index=False, na_rep="n/a"), group / GROUP_TABLE)
    hist = pd.concat([pd.read_csv(p["tables"][key + "histogram"], sep="\t") for p in done],
                     ignore_index=True)
    figure = angle_figure(hist.to_dict("records"), group / GROUP_FIGURE,
                          title=f"Acute angle to the b0 gradient, {len(done)} subject(s)")
    return {"table": str(table), "figure": str(figure), "n_subjects": len(done)}


# ----------------------------------------------------------------------------
# Pydra tasks (thin wrappers)
# ----------------------------------------------------------------------------

@python.define(outputs=["image_gradient"])
@guarded(STEP)
def ImageGradient(subject: str, record: dict, estimators: list | None = None,
                  timing: dict | None = None, max_voxels: int = 0,
                  pipeline_version: str = "") -> dict:
    """Image-gradient estimates, controls and angles of one subject (product
    record for Export). ``timing``: command-line Delta/delta/TE (ms) that
    override the sidecar's; ``max_voxels``: evaluate a seeded random subset
    (0: all voxels; the nonlinear A costs ~25 ms per voxel and fit with 288
    volumes)."""
    seq, source = resolve_timing(timing, record.get("sidecar"), record["series"]["dwi"])
    product = subject_products(load_series(record), seq,
                               parse_estimators(estimators or DEFAULT_ESTIMATORS),
                               Path.cwd(), subject, max_voxels)
    product["parameters"]["timing_source"] = source
    return product


@python.define(outputs=["table"])
def ImageGradientGroup(products: list, output_dir: str, pipeline_version: str = "") -> str:
    """The cohort's image-gradient table and figure (group folder); "" when
    no subject has results (their failures are in group/subjects.tsv)."""
    Path(STEP_MARKER).write_text("group")   # re-exported with the group table
    if not any(p and p.get("status") == "ok" for p in products):
        return ""
    return write_group(list(products), output_dir)["table"]
