"""The cohort HTML report: its tables and figures, and the page rendered in headless Chromium."""

from __future__ import annotations

import base64
import fcntl
import io as bytes_io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dmriflow.interfaces import codec
from dmriflow.interfaces.sim.phantom import SiteEffect, hcp_scheme, write_cohort
from dmriflow.pipelines import cli
from dmriflow.pipelines.report import (REPORT_FILE, _axial, _canonical, _centre, _coronal,
                                       colour_fa, qc_flags, qc_section)

SHAPE = (18, 22, 16)
N_SUBJECTS = 3
BROKEN = 1                        # index of the subject whose bvecs are one short
SHELLS = (1000, 2000)
N_ORDERS = 4                      # 30 directions -> lmax 6 -> l = 0, 2, 4, 6
#: Chromium flags that work on this machine (no sandbox as root, no network).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")
PAGE_WIDTH = 1200
#: Where each image landed on the page, and whether it decoded (naturalWidth > 0).
IMAGE_BOXES_JS = """JSON.stringify(Array.from(document.images).map(img => {
  const r = img.getBoundingClientRect(), s = img.closest('section');
  return {section: s ? s.id : null, x: r.left + window.scrollX, y: r.top + window.scrollY,
          w: r.width, h: r.height, natural: img.naturalWidth};
}))"""
BROWSER_TIMEOUT_S = 60


# ----------------------------------------------------------------------------
# The page, parsed
# ----------------------------------------------------------------------------
class Page(HTMLParser):
    """Tables (rows of cell texts) and image sources of each <section id=...>."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.images, self.tags = {}, {}, set()
        self._section, self._row, self._cell = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self._section = a.get("id")
        elif tag == "table":
            self.tables.setdefault(self._section, []).append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.setdefault(self._section, []).append(a["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            self.tables[self._section][-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def png(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(bytes_io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
                      .convert("RGB"))


# ----------------------------------------------------------------------------
# A cohort run with one broken subject
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    scheme = hcp_scheme(n_b0=4, shells=SHELLS, n_dirs=30, seed=1)
    labels = write_cohort(tmp / "in", N_SUBJECTS, layout="hcp", shape=SHAPE, seed=0,
                          scheme=scheme)
    bad = tmp / "in" / labels[BROKEN] / "T1w" / "Diffusion" / "bvecs"
    np.savetxt(bad, np.loadtxt(bad)[:, :-1])
    code = cli.main(["run", str(tmp / "in"), str(tmp / "out"), "--worker", "cf",
                     "--n-procs", "2", "--quiet", "--cache-dir", str(tmp / "cache")])
    assert code == cli.EXIT_SUBJECTS_FAILED
    report = tmp / "out" / "dmriflow" / REPORT_FILE
    return tmp, labels, bad, report


def test_qc_table_has_every_subject(run):
    tmp, labels, bad, report = run
    page = Page(report.read_text())
    table = pd.read_csv(tmp / "out" / "dmriflow" / "group" / "subjects.tsv", sep="\t")
    (qc,) = page.tables["qc"]
    head, rows = qc[0], qc[1:]
    assert head[:6] == ["Subject", "Status", "Protocol", "Mask (ml)", "b0 SNR", "Median FA"]
    assert [r[0] for r in rows] == [f"sub-{lbl}" for lbl in labels]
    assert [r[1] for r in rows] == ["failed" if i == BROKEN else "done"
                                    for i in range(N_SUBJECTS)]
    broken = rows[BROKEN]
    uri = "bids:raw:" + bad.relative_to(tmp / "in").as_posix()     # as OUTPUT names inputs
    assert broken[6] == "validate" and uri in broken[7] and "63 vectors" in broken[7]
    for i, (lbl, row) in enumerate(zip(labels, rows)):
        if i == BROKEN:
            continue
        tsv = table[table["subject"] == f"sub-{lbl}"].iloc[0]
        mask = nib.load(tmp / "in" / lbl / "T1w" / "Diffusion" / "nodif_brain_mask.nii.gz")
        ml = (np.asarray(mask.dataobj) > 0).sum() * np.prod(mask.header.get_zooms()) / 1e3
        assert float(row[3]) == pytest.approx(ml, abs=0.5)
        assert float(row[4]) == pytest.approx(tsv["b0_snr"], abs=0.05)
        assert float(row[5]) == pytest.approx(tsv["median_fa"], abs=5e-4)
        # the noise estimate behind the SNR recovers the simulated sigma
        truth = json.loads((tmp / "in" / lbl / "T1w" / "Diffusion" / "data.json").read_text())
        assert tsv["noise_sigma"] == pytest.approx(
            truth["PhantomSimulation"]["NoiseSigma"], rel=0.05)
    (census,) = page.tables["census"]
    assert {r[0]: r[1] for r in census[1:]} == {"P1": "2", "unreadable": "1"}


def test_figures_are_embedded(run):
    _, labels, _, report = run
    text = report.read_text()
    page = Page(text)
    n_done = N_SUBJECTS - 1
    fa_panels = page.images["fa"]
    assert len(fa_panels) == 3 * n_done           # FA axial, colour FA axial and coronal
    grey, colour = png(fa_panels[0]), png(fa_panels[1])
    assert np.array_equal(grey[..., 0], grey[..., 1]) and grey.max() > 200
    spread = colour.max(axis=2).astype(int) - colour.min(axis=2)
    assert (spread > 60).mean() > 0.02            # coloured (not grey) voxels
    assert len(page.images["rish"]) == len(SHELLS) * n_done * N_ORDERS
    assert all(png(u).std() > 5 for u in page.images["rish"])
    assert len(page.images["qc"]) == 1
    # self-contained: every image inline, no script, stylesheet link or remote address
    assert all(u.startswith("data:image/png;base64,")
               for u in sum(page.images.values(), []))
    assert not {"script", "link", "iframe"} & page.tags
    assert not re.search(r"https?://|(?:src|href)=\"(?!data:)", text)
    for absent in ("harmonization", "image-gradient", "models", "motion"):
        assert f'id="{absent}"' not in text


def test_report_command_rewrites_the_page(run):
    tmp, _, _, report = run
    before = Page(report.read_text()).tables["qc"]
    report.unlink()
    assert cli.main(["report", str(tmp / "out")]) == cli.EXIT_OK
    assert Page(report.read_text()).tables["qc"] == before
    assert cli.main(["report", str(tmp / "nowhere")]) == cli.EXIT_INPUT


def test_prepare_imports_what_drawing_the_report_needs(run):
    """A run imports the report's libraries beside its engine (report.prepare):
    building the page after it imports no matplotlib or PIL module of its own."""
    tmp = run[0]
    script = ("import sys\n"
              "from dmriflow.pipelines import report\n"
              "report.prepare()\n"
              "before = set(sys.modules)\n"
              f"report.build_report({str(tmp / 'out')!r})\n"
              "print(sorted(m for m in set(sys.modules) - before\n"
              "             if m.split('.')[0] in ('matplotlib', 'PIL')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.strip() == "[]"


def test_image_gradient_and_model_sections(run, tmp_path):
    """The image-gradient group outputs (written by the step's own functions for
    the done subjects) and a model card's metrics appear once they exist."""
    from dmriflow.interfaces import image_gradient as ig
    from dmriflow.interfaces.io import load_dwi, write_json
    from dmriflow.models.card import Acquisition, ModelCard
    from dmriflow.interfaces.stepfiles import subject_products
    from dmriflow.pipelines.image_gradient import GROUP_TABLE, write_group
    tmp, labels, _, report = run
    out = tmp_path / "out"
    shutil.copytree(tmp / "out" / "dmriflow", out / "dmriflow")
    products = []
    for i, lbl in enumerate(labels):
        if i == BROKEN:
            continue
        d = tmp / "in" / lbl / "T1w" / "Diffusion"
        (tmp_path / lbl).mkdir()
        data = load_dwi(d / "data.nii.gz", d / "bvals", d / "bvecs", d / "nodif_brain_mask.nii.gz")
        products.append(subject_products(data, ig.HCP_TIMING, ("B",), tmp_path / lbl,
                                         f"sub-{lbl}", max_voxels=400))
    write_group(products, out)
    metrics = [{"split": "test", "metric": "rish_l0_rel_error", "value": 0.042}]
    card = ModelCard(name="rish-ldm", version="2", architecture="unet", kwargs={},
                     acquisition=Acquisition(shells=[1000.0]), metrics=metrics)
    write_json(card.to_dict(), out / "dmriflow" / "models" / "rish-ldm" / "card.json")
    assert cli.main(["report", str(out)]) == cli.EXIT_OK
    page = Page((out / "dmriflow" / REPORT_FILE).read_text())
    (figure,) = page.images["image-gradient"]
    assert png(figure).shape[1] > 300
    (tests,) = page.tables["image-gradient"]
    table = pd.read_csv(out / "dmriflow" / "group" / GROUP_TABLE, sep="\t")
    overall = table[table["stratum"] == "all"]
    assert tests[0] == list(table.columns) and len(tests) - 1 == len(overall) > 0
    assert [r[1] for r in tests[1:]] == list(overall["method"])
    (model,) = page.tables["models"]
    assert len(model) == 2 and dict(zip(*model)) == {"split": "test", "value": "0.042",
                                                     "metric": "rish_l0_rel_error"}


def test_qc_flags_mark_outliers_within_their_protocol_group():
    n = 8
    spread = np.linspace(-1.0, 1.0, n)       # robust |z| <= 1.3 within P1
    table = pd.DataFrame({
        "subject": [f"sub-{i:02d}" for i in range(n + 4)],
        "status": ["done"] * n + ["failed"] + ["done"] * 3,
        "protocol": ["P1"] * n + ["unreadable"] + ["P2"] * 3,
        "mask_volume_ml": np.r_[1400 + 30 * spread, np.nan, 1400, 1400, 5000],
        "b0_snr": np.r_[30 + spread[:-1], 12.0, np.nan, 30, 31, 29],
        "median_fa": np.r_[0.3 + 0.01 * spread, np.nan, 0.3, 0.31, 0.29]})
    flags = qc_flags(table)
    assert list(flags[flags != ""].index) == [n - 1]      # P2 (3 subjects) is not judged
    assert flags[n - 1].startswith("b0 SNR low (z -")
    x = table["b0_snr"][:n]
    z = (12.0 - x.median()) / (1.4826 * (x - x.median()).abs().median())
    assert f"z {z:+.1f}" in flags[n - 1]
    html = qc_section(table)
    assert html.count('class="flagged"') == 1 and "<b>1</b>QC outlier(s)" in html


def test_colour_fa_follows_the_anatomical_axes(tmp_path):
    """A file whose voxel axes are (S, R, A): V1 along voxel axis 0 is
    inferior-superior, hence blue; along axis 1 red; along axis 2 green."""
    affine = np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    shape = (4, 5, 6)
    fa = np.full(shape, 0.8, np.float32)
    v1 = np.zeros(shape + (3,), np.float32)
    v1[0, ..., 0] = -1.0                     # sign does not matter
    v1[1, ..., 1] = 1.0
    v1[2:, ..., 2] = 1.0
    nib.save(nib.Nifti1Image(fa, affine), tmp_path / "fa.nii.gz")
    nib.save(nib.Nifti1Image(v1, affine), tmp_path / "v1.nii.gz")
    fa_c, _ = _canonical(tmp_path / "fa.nii.gz")
    v1_c, perm = _canonical(tmp_path / "v1.nii.gz")
    rgb = colour_fa(fa_c, v1_c, perm)
    assert rgb.shape == (5, 6, 4, 3)         # RAS: R = file axis 1, A = 2, S = 0
    np.testing.assert_allclose(rgb[:, :, 0], np.broadcast_to([0, 0, 0.8], (5, 6, 3)))
    np.testing.assert_allclose(rgb[:, :, 1], np.broadcast_to([0.8, 0, 0], (5, 6, 3)))
    np.testing.assert_allclose(rgb[:, :, 3], np.broadcast_to([0, 0.8, 0], (5, 6, 3)))


def test_centre_is_the_mean_voxel_of_the_region():
    """The cut voxel: the rounded mean index of the FA > 0 voxels (NaN and 0 outside),
    as ``np.argwhere`` lists them; a half rounds to even."""
    fa = np.zeros((7, 9, 5), np.float32)
    fa[2:5, 1:8, 3] = 0.5                            # box: centre (3, 4, 3)
    assert _centre(fa) == (3, 4, 3)
    fa[:] = np.nan
    fa[0:2, 4, 1:5] = 0.2                            # means 0.5, 4, 2.5 -> 0, 4, 2
    assert _centre(fa) == (0, 4, 2)
    assert _centre(np.zeros((6, 4, 3))) == (3, 2, 1)
    rng = np.random.default_rng(3)
    for shape in ((11, 13, 7), (1, 5, 9), (20, 3, 16)):
        vol = np.where(rng.random(shape) < 0.3, rng.random(shape), -rng.random(shape))
        listed = np.argwhere(vol > 0).mean(axis=0)
        assert _centre(vol) == tuple(int(round(v)) for v in listed)


def test_colour_fa_of_a_slice_is_the_slice_of_the_volume():
    """The report colours only the slices it draws: the same numbers, to the bit,
    as the slices of the coloured volume (NaN, FA above 1, any permutation)."""
    rng = np.random.default_rng(4)
    fa = rng.uniform(-0.2, 1.3, (6, 7, 5)).astype(np.float32)
    fa[1, 2, 3] = np.nan
    v1 = rng.normal(size=(6, 7, 5, 3)).astype(np.float32)
    v1[4, 4, 4, 1] = np.nan
    perm = np.array([2, 0, 1])
    volume = colour_fa(fa, v1, perm)
    for cut, k in ((_axial, 3), (_coronal, 2), (_axial, 0)):
        sliced = colour_fa(cut(fa, k), cut(v1, k), perm)
        assert sliced.shape == cut(volume, k).shape
        assert sliced.tobytes() == cut(volume, k).tobytes()


@pytest.mark.parametrize("name", ["map.nii.gz", "map.nii"])
def test_maps_read_as_nibabel_reads_them(tmp_path, name):
    """A map read by the report (a .nii.gz inflated by the codec) is nibabel's array
    reoriented to RAS, to the bit; a scaled file keeps its scaling."""
    affine = np.array([[-2.0, 0, 0, 9], [0, 0, 2.0, -3], [0, 2.5, 0, 1], [0, 0, 0, 1]])
    data = np.random.default_rng(5).normal(size=(5, 6, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / name)
    scaled = nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(5, 6, 4), affine)
    scaled.header.set_slope_inter(0.5, 2.0)
    nib.save(scaled, tmp_path / ("s" + name))
    for path in (tmp_path / name, tmp_path / ("s" + name)):
        want = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32)
        got, perm = _canonical(path)
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
        assert perm.tolist() == [0, 2, 1]


def test_a_map_with_a_wrong_gzip_checksum_is_named(tmp_path):
    """A flipped bit in a map's gzip CRC (nibabel stops once it has the voxels and
    never checks it) stops the read with the map's name, not a picture of damaged data."""
    path = tmp_path / "sub-1_model-tensor_param-fa_dwimap.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5), np.float32), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 1                                     # the trailer's CRC32
    path.write_bytes(raw)
    with pytest.raises(codec.CorruptGzipError, match=f"^{path.name}: CRC32/length check failed"):
        _canonical(path)


def test_harmonization_fit_report(tmp_path):
    """harmonize fit writes a report whose harmonization section shows the
    artefact, its evaluation table (one row per metric) and the before/after
    figure; a run applying the artefact reports both."""
    scheme = hcp_scheme(n_b0=3, shells=(1000,), n_dirs=20, seed=2)
    shape = (14, 16, 12)
    root = tmp_path / "bids"
    write_cohort(root, 3, layout="bids", shape=shape, seed=5, scheme=scheme,
                 subject_prefix="a")
    write_cohort(root, 3, layout="bids", shape=shape, seed=5, scheme=scheme,
                 subject_prefix="b", site=SiteEffect(name="siteB", rish_scale={0: 0.8}))
    table = root / "sites.tsv"
    table.write_text("participant_id\tsite\n" + "".join(
        f"{p.name}\t{'siteA' if p.name.startswith('sub-a') else 'siteB'}\n"
        for p in sorted(root.glob("sub-*"))))
    out = tmp_path / "out"
    assert cli.main(["harmonize", "fit", str(root), str(out), "--reference", "siteA",
                     "--target", "siteB", "--site-column", "site", "--site-table", str(table),
                     "--registration", "identity", "--worker", "cf", "--quiet",
                     "--cache-dir", str(tmp_path / "cache")]) == cli.EXIT_OK
    effect = pd.read_csv(out / "dmriflow" / "group" / "harmonization_site_effect.tsv", sep="\t")
    page = Page((out / "dmriflow" / REPORT_FILE).read_text())
    artefacts, site_table, preservation = page.tables["harmonization"]
    assert artefacts[1][1:3] == ["siteA", "siteB"] and artefacts[1][-1] == "6"
    _check_site_table(site_table, effect)
    assert [r[1] for r in preservation[1:]] == ["sub-b01", "sub-b02", "sub-b03"]
    (figure,) = page.images["harmonization"]
    assert png(figure).std() > 10
    # a run applying the artefact shows the harmonised subjects and the fit's evaluation
    art = next((out / "dmriflow" / "harmonization").iterdir())
    applied = tmp_path / "applied"
    assert cli.main(["harmonize", "apply", str(art), str(root), str(applied),
                     "--participant-label", "b01", "b02", "--worker", "cf", "--quiet",
                     "--cache-dir", str(tmp_path / "cache")]) == cli.EXIT_OK
    text = (applied / "dmriflow" / REPORT_FILE).read_text()
    assert f"2 subject(s) harmonised with artefact(s) {art.name}" in text
    page = Page(text)
    _check_site_table(page.tables["harmonization"][0], effect)
    assert len(page.images["harmonization"]) == 1 and len(page.images["fa"]) == 2 * 3


def _check_site_table(rows, effect):
    assert [r[0] for r in rows[1:]] == list(effect["metric"])
    d_col = rows[0].index("d_before")
    assert [float(r[d_col]) for r in rows[1:]] == pytest.approx(list(effect["d_before"]),
                                                                 rel=1e-3)


# ----------------------------------------------------------------------------
# Headless Chromium through the DevTools protocol (--remote-debugging-pipe)
# ----------------------------------------------------------------------------
def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("DMRIFLOW_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required (DMRIFLOW_REQUIRE_CHROMIUM=1) but not on PATH")
        pytest.skip("chromium is not installed (Debian package 'chromium')")
    return exe


class Browser:
    """One headless Chromium driven over the DevTools pipe (fds 3 and 4)."""

    def __init__(self, exe: str, profile: Path):
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        # move the child's ends out of the way, then let the shell put them on 3 and 4
        child = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (cmd_r, res_w)]
        for fd in (cmd_r, res_w):
            os.close(fd)
        script = f'exec "$@" 3<&{child[0]} 4>&{child[1]} {child[0]}<&- {child[1]}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", script, "chromium", exe, *CHROMIUM_FLAGS,
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=child, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in child:
            os.close(fd)
        self.w, self.r, self.buf, self.next_id, self.events = cmd_w, res_r, b"", 0, []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            if select.select([self.r], [], [], left)[0]:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed the DevTools pipe")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        while True:
            m = self._message(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_for(self, event: str) -> None:
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        while not any(m.get("method") == event for m in self.events):
            self.events.append(self._message(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, EOFError, TimeoutError, RuntimeError):
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self.w)
        os.close(self.r)


def render(page: Path, screenshot: Path) -> tuple[list[str], list[dict]]:
    """Load ``page`` and save a full-page screenshot. Returns every error the
    page raised (uncaught exceptions, console.error calls, failed resource
    loads) and, per <img>, its section, page box (CSS px) and decoded width."""
    with tempfile.TemporaryDirectory() as profile:
        b = Browser(chromium(), Path(profile))
        try:
            target = b.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = b.call("Target.attachToTarget", {"targetId": target,
                                                   "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                b.call(f"{domain}.enable", session=sid)
            b.call("Emulation.setDeviceMetricsOverride", {"width": PAGE_WIDTH, "height": 900,
                                                          "deviceScaleFactor": 1,
                                                          "mobile": False}, session=sid)
            b.call("Page.navigate", {"url": page.resolve().as_uri()}, session=sid)
            b.wait_for("Page.loadEventFired")
            height = b.call("Page.getLayoutMetrics", session=sid)["cssContentSize"]["height"]
            boxes = json.loads(b.call("Runtime.evaluate", {"expression": IMAGE_BOXES_JS,
                                                           "returnByValue": True},
                                      session=sid)["result"]["value"])
            shot = b.call("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": PAGE_WIDTH, "height": height, "scale": 1}},
                session=sid)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        finally:
            b.close()
    errors = []
    for m in b.events:
        method, p = m.get("method"), m.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append(f"exception: {d.get('exception', {}).get('description', d['text'])}")
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            errors.append(f"console.{p['type']}: {[a.get('value') for a in p['args']]}")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            errors.append(f"network: {p.get('errorText')}")
    return errors, boxes


def test_browser_check_detects_page_errors(tmp_path):
    """The check below must see a script error, a console error and a missing file."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><h1>broken</h1><img src="missing.png">'
                    '<script>console.error("deliberate"); undefinedFunction();</script>'
                    "</body></html>")
    errors, boxes = render(page, tmp_path / "broken.png")
    text = "\n".join(errors)
    assert "undefinedFunction is not defined" in text
    assert "deliberate" in text
    assert "ERR_FILE_NOT_FOUND" in text and "missing.png" in text
    assert [b["natural"] for b in boxes] == [0]          # the missing image did not decode
    fine = tmp_path / "fine.html"
    fine.write_text("<!DOCTYPE html><html><body><h1>fine</h1><script>console.log(1)</script>"
                    "</body></html>")
    assert render(fine, tmp_path / "fine.png") == ([], [])


def test_report_renders_in_chromium(run, tmp_path):
    _, _, _, report = run
    shot = tmp_path / "report.png"
    errors, boxes = render(report, shot)
    assert errors == []
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[1] == PAGE_WIDTH and img.shape[0] > 1500   # the whole page
    non_white = (img < 235).any(axis=2)
    assert non_white.mean() > 0.10
    assert np.unique((img[..., 0] << 16) | (img[..., 1] << 8) | img[..., 2]).size > 500
    # every figure decoded and shows up on the screenshot where the page put it
    n_done = N_SUBJECTS - 1
    counts = {sec: sum(b["section"] == sec for b in boxes) for sec in ("qc", "fa", "rish")}
    assert counts == {"qc": 1, "fa": 3 * n_done, "rish": len(SHELLS) * n_done * N_ORDERS}
    for box in boxes:
        assert box["natural"] > 0 and box["w"] > 50 and box["h"] > 50, box
        x, y = int(box["x"]), int(box["y"])
        region = img[y:y + int(box["h"]), x:x + int(box["w"])]
        assert region.std() > 20, box                      # not blank
    colour_fa = [b for b in boxes if b["section"] == "fa"][1]
    region = img[int(colour_fa["y"]):int(colour_fa["y"] + colour_fa["h"]),
                 int(colour_fa["x"]):int(colour_fa["x"] + colour_fa["w"])]
    assert (region.max(axis=2) - region.min(axis=2) > 60).mean() > 0.02   # coloured


def test_motion_section_for_a_corrected_subject(tmp_path):
    """--motion-correction on a raw BIDS subject: the report draws its motion traces and
    states the summary of its motion table, the same as the subjects table row."""
    scheme = hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1)
    write_cohort(tmp_path / "in", 1, layout="bids", shape=(14, 16, 12), seed=3, scheme=scheme)
    out = tmp_path / "out"
    assert cli.main(["run", str(tmp_path / "in"), str(out), "--worker", "debug", "--quiet",
                     "--cache-dir", str(tmp_path / "cache"), "--motion-correction",
                     "--motion-iterations", "1", "--motion-fd-threshold", "0.2"]) == cli.EXIT_OK
    page = Page((out / "dmriflow" / REPORT_FILE).read_text())
    assert len(page.images["motion"]) == 1
    fig = png(page.images["motion"][0])
    assert fig.shape[0] > 200 and fig.std() > 5
    [table] = page.tables["motion"]
    header, row = table[0], dict(zip(table[0], table[1]))
    assert header[:2] == ["Subject", "Motion table"] and len(table) == 2
    assert row["Subject"] == "sub-01"
    assert row["Motion table"] == "sub-01_desc-motion_timeseries.tsv"
    assert row["Volumes"] == str(len(scheme)) and row["Threshold (mm)"] == "0.2"
    subjects = pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t").iloc[0]
    assert float(row["Mean FD (mm)"]) == pytest.approx(subjects["motion_fd_mean"], abs=5e-4)
    assert float(row["Max FD (mm)"]) == pytest.approx(subjects["motion_fd_max"], abs=5e-4)
    assert int(row["Volumes over"]) == subjects["motion_volumes_over_threshold"]


def test_an_unchanged_qc_figure_is_taken_from_the_previous_page(tmp_path, monkeypatch):
    """A cached rerun does not redraw (import matplotlib for) a figure whose table and
    code are unchanged: the picture comes from the previous page, keyed; a changed
    table is drawn anew; a picture that is not plain base64 is never taken."""
    from dmriflow.pipelines import report
    table = pd.DataFrame({"subject": [f"sub-{i}" for i in range(4)], "status": ["done"] * 4,
                          "protocol": ["P1"] * 4, "mask_volume_ml": [1400.0, 1410, 1390, 1405],
                          "b0_snr": [30.0, 31, 29, 30], "median_fa": [0.30, 0.31, 0.29, 0.30]})
    first = qc_section(table)
    page = tmp_path / REPORT_FILE
    page.write_text(f"<html><body>{first}</body></html>")
    previous = report.previous_figures(page)
    assert len(previous) == 1 and next(iter(previous.values())) in first
    monkeypatch.setattr(report, "qc_figure", lambda t: pytest.fail("an unchanged figure redrawn"))
    assert qc_section(table, previous) == first
    monkeypatch.undo()
    changed = qc_section(table.assign(median_fa=[0.40, 0.41, 0.39, 0.40]), previous)
    (new_key, new_picture), = report.KEYED_FIGURE.findall(changed)
    assert new_key not in previous and new_picture not in previous.values()
    page.write_text(first.replace("base64,", 'base64,"><script>x</script>'))
    assert report.previous_figures(page) == {}
