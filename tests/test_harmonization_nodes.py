"""The engine's per-subject registration nodes give the serial fit's artefact."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from dmriflow.interfaces import harmonize as H
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.interfaces.io import DWI
from dmriflow.interfaces.sim import phantom
from dmriflow.pipelines import harmonization as P

SHAPE = (20, 24, 18)
LMAX = 4
BVAL = 1000.0
N_PER_SITE = 3
TARGET = phantom.SiteEffect(name="siteB", rish_scale={0: 0.9, 2: 1.2, 4: 0.8}, snr=25.0)


def _features(seed: int, site) -> H.SubjectFeatures:
    scheme: GradientTable = phantom.hcp_scheme(n_b0=4, shells=(BVAL,), n_dirs=30)
    s = phantom.simulate_subject(SHAPE, seed=seed, snr=40.0, scheme=scheme, site=site)
    dwi = DWI(np.asfortranarray(s.dwi, dtype=np.float32), s.gtab, s.mask, s.affine, None, {})
    return H.subject_features(dwi, f"{site.name}{seed}", LMAX)


def _in(folder: Path, fn, **kw):
    """Run a node function in its own working folder (as the engine does)."""
    folder.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return fn(**kw)
    finally:
        os.chdir(cwd)


def _entry(f: H.SubjectFeatures, folder: Path) -> dict:
    """A features node's record of ``f`` (files as the engine stores them)."""
    folder.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return {"subject": f.subject, "status": "ok", "sha256": f.content_hash(),
                "fa": P._save(f.fa, f.affine, "fa.nii.gz"),
                "mask": P._save(f.mask.astype(np.uint8), f.affine, "mask.nii.gz"),
                "rish": {f"{b:g}": P._save(r, f.affine, f"rish_b{b:g}.nii.gz")
                         for b, r in f.rish.items()}}
    finally:
        os.chdir(cwd)


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.nii.gz"))}


@pytest.mark.parametrize("registration, contrast", [("syn", "fa"), ("affine", "fa"),
                                                    ("affine", "rish-l2")])
def test_per_subject_nodes_give_the_serial_artefact(tmp_path, registration, contrast):
    sites = {}
    entries = []
    for k, site in enumerate([phantom.SiteEffect(name="siteA")] * N_PER_SITE
                             + [TARGET] * N_PER_SITE):
        f = _features(20 + k % N_PER_SITE, site)
        sites[f.subject] = site.name
        entries.append(_entry(f, tmp_path / "features" / f.subject))
    common = dict(sites=sites, shells=[BVAL], contrast=contrast)
    tpl = _in(tmp_path / "t0", P.template_start_step, features=entries, reference_site="siteA",
              target_site="siteB", **common)
    for r in range(1, H.TEMPLATE_ITERATIONS + 1):
        reg = [_in(tmp_path / f"r{r}" / e["subject"], P.register_subject_step, entry=e,
                   template=tpl, register_sites=["siteA"], registration=registration, **common)
               for e in entries]
        tpl = _in(tmp_path / f"t{r}", P.template_mean_step, features=entries,
                  reference_site="siteA", template=tpl, registered=reg, **common)
    reg = [_in(tmp_path / "reg" / e["subject"], P.register_subject_step, entry=e, template=tpl,
               register_sites=["siteA", "siteB"], registration=registration, **common)
           for e in entries]
    ref = [P._loader(e) for e in entries if sites[e["subject"]] == "siteA"]
    tar = [P._loader(e) for e in entries if sites[e["subject"]] == "siteB"]
    info = {"source": "reference-site mean", "iterations": H.TEMPLATE_ITERATIONS,
            "first_subject": tpl["first_subject"], "registration": registration}
    nodes = H.fit_harmonization(ref, tar, [BVAL], LMAX, registration=registration,
                                template=P._template(tpl), template_info=info,
                                registered=P._transforms(reg), registration_contrast=contrast)
    serial = H.fit_harmonization(ref, tar, [BVAL], LMAX, registration=registration,
                                 registration_contrast=contrast)
    assert nodes.registration_contrast == serial.registration_contrast == contrast
    assert nodes.content_id == serial.content_id
    assert nodes.parameters == serial.parameters
    a, b = nodes.save(tmp_path / "nodes"), serial.save(tmp_path / "serial")
    assert _digests(a) == _digests(b)
