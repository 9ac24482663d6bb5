"""The image-gradient step in the engine (SCIENCE.md section 7).

Per subject, the registered step :mod:`dmriflow.interfaces.steps.image_gradient`
(task ``ImageGradient``) runs the one-series estimators of
:mod:`dmriflow.interfaces.image_gradient` with every control and writes
angle maps and tidy rows into its node folder; its product is exported with
the subject's other derivatives. Per cohort, :class:`ImageGradientGroup` writes
``group/image_gradient.tsv`` (one-sample tests against chance and paired
tests against the fibre-only controls, estimators beside controls) and the
figure ``group/image_gradient_angles.png``.

Here :func:`write_group` and :func:`angle_figure` hold the cohort logic
without touching the engine; the Pydra task at the end is a thin wrapper.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from pydra.compose import python

from dmriflow.interfaces import image_gradient as ig
from dmriflow.interfaces import io
from dmriflow.interfaces.bids_names import format_entities, parse_name
from dmriflow.interfaces.steps.base import TABLE_EXTENSION, product_from_record
from dmriflow.interfaces.stepfiles import IMAGE_GRADIENT_STEP, MODEL_ENTITY
from dmriflow.pipelines.derivatives import derivative_file
from dmriflow.pipelines.steps import STEP_MARKER

#: Step name (node marker, failure records, sidecars).
STEP = IMAGE_GRADIENT_STEP
GROUP_TABLE = "image_gradient.tsv"
GROUP_FIGURE = "image_gradient_angles.png"


# ----------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------
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
    import matplotlib  # heavy, optional: only when the figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path = io.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------
# The cohort: tests table and figure
# ----------------------------------------------------------------------------
def write_group(products: list[dict], output_dir) -> dict:
    """``group/image_gradient.tsv`` (``cohort_tests``: estimators beside nulls
    and controls, each against chance and paired against the fibre-only
    controls) and ``group/image_gradient_angles.png`` from the subjects'
    product records (failed subjects are left out and counted)."""
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


def products_from_status(rows: list[dict], output_dir) -> list[dict]:
    """The subjects' image-gradient products as :func:`write_group` reads them,
    from their status rows (the exported tables, found by their entities): what
    the group level has of subjects that participant jobs ran one by one. A
    failed subject counts as a failed product, a missing one not at all."""
    model = MODEL_ENTITY.split("-", 1)[1]
    products = []
    for row in rows:
        tables = {}
        for entry in row.get("derivatives", []) if row.get("status") == "done" else []:
            entities, _, ext = parse_name(entry)
            if ext == TABLE_EXTENSION and entities.get("model") == model and "desc" in entities:
                tables[f"{MODEL_ENTITY}_desc-{entities['desc']}"] = str(
                    derivative_file(entry, output_dir))
        if tables:
            products.append({"status": "ok", "tables": tables})
        elif row.get("status") == "failed":
            products.append({"status": "failed"})
    return products


def group_from_status(rows: list[dict], output_dir) -> dict | None:
    """The cohort's image-gradient table and figure from the status rows (the
    group level); None when no done subject has image-gradient results."""
    products = products_from_status(rows, output_dir)
    if not any(p["status"] == "ok" for p in products):
        return None
    return write_group(products, output_dir)


# ----------------------------------------------------------------------------
# Pydra tasks (thin wrappers)
# ----------------------------------------------------------------------------

def subject_product(products: list[dict]) -> dict | None:
    """A subject's image-gradient product among its product records, its files
    keyed by entities text as :func:`write_group` reads them."""
    mine = next((p for p in products if p.get("step") == STEP
                 or p.get("failed_step") == STEP), None)
    if mine is None or mine.get("status") != "ok":
        return mine
    prod = product_from_record(mine)
    return {**mine, "tables": {format_entities(d.entities): d.path for d in prod.tables}}


def image_gradient_group_step(products: list, output_dir: str, pipeline_version: str = "") -> str:
    """The cohort's image-gradient table and figure (group folder); "" when
    no subject has results (their failures are in group/subjects.tsv).
    ``products``: each subject's product records (Export's ``products``)."""
    Path(STEP_MARKER).write_text("group")   # re-exported with the group table
    mine = [subject_product(p) for p in products]
    if not any(p and p.get("status") == "ok" for p in mine):
        return ""
    return write_group(mine, output_dir)["table"]


ImageGradientGroup = python.define(image_gradient_group_step,
                                   outputs=["table"], name="ImageGradientGroup")
