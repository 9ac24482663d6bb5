"""Study: where the one-signed residual of RISH harmonization on brains comes from.

The unpaired/paired two-site study of ``bench/harmonize_unpaired.py`` with the
registrations done once: the reference site (the same persons in both
designs) gives one template, every scan (fit cohorts of both designs and the
held-out persons' target scans) is registered to it once, and each variant
only recomputes the scale maps from the cached warps and applies them with
the cached held-out transforms. Rows: held-out site effect (Cohen's d after,
relative difference of the means), held-out group-effect ratio (FA, RISH l2)
and the minimum FA correlation with the truth, unpaired / paired.

``--contrasts fa rish-l0 ...`` repeats everything (template and every
registration) per registration contrast and adds, on brains, the held-out
registrations' accuracy against the phantom's known warps. ``fa-sitescaled``
registers each design's target scans (fit and held-out) through their FA
after that design's global site factors, so its held-out transforms and
accuracy rows are per design.

``--match-resolution`` repeats the coarser (target) scans' registrations per
rule of ``harmonize.RESOLUTION_MATCH_RULES`` (the template blurred to their
voxels; the template and the reference registrations are shared);
``--blur-all-sd`` is its control: every scan registered to the template
blurred by one isotropic Gaussian.

Run: ``.venv/bin/python bench/harmonize_bias.py [--seed N] [--template-eval]
[--variants ratio matched ...] [--refit-rounds 0 1] [--contrasts fa rish-l2 rish-l0]
[--noise-floor 0 1] [--tissue-pool-fwhm 0 5 10 20]
[--match-resolution off box box-linear fwhm K] [--blur-all-sd MM]
[--target-voxel 2.5 --target-snr 30 ...]``
(brain anatomy on the 28 x 34 x 26 grid by default; ``--anatomy geometric
--shape 24 28 22`` for the geometric study). docs/harmonization.md, "The
one-signed residual on brains", has the measured rows.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import numpy as np

from dmriflow.interfaces import harmonize as H
from dmriflow.interfaces.sim import phantom
from dmriflow.interfaces.sim import unpaired as U


def load1() -> str:
    with open("/proc/loadavg") as fh:
        return fh.read().split()[0]


def before_after(rows) -> str:
    """Site rows as ``metric [bN] d_before > d_after (rel_after %)``, joined by '; '."""
    return "; ".join(
        f"{r['metric']}{'' if math.isnan(r['shell']) else ' b%g' % r['shell']} "
        f"{r['d_before']:.2f} > {r['d_after']:.2f} ({100 * r['rel_after']:+.1f} %)" for r in rows)


def template_measures(sc, data, transform, wm) -> dict:
    """White-matter means of FA, MD and RISH l0/l2/l4 per shell of one scan
    warped to the template, over the template's white matter ``wm``."""
    from dmriflow.interfaces import dti
    dwi = U.as_dwi(sc, data)
    tf = dti.fit_dwi(dwi.select_volumes(dwi.gtab.select_shells(H.dti_shells(dwi.gtab))))
    out = {}
    for name, vol in (("fa", tf.fa), ("md", tf.md)):
        out[(name, math.nan)] = float(transform.to_template(np.where(dwi.mask, vol, 0))[wm].mean())
    for b, r in H.rish_maps(dwi, U.STUDY_LMAX).items():   # orders 0, 2, 4 (EVAL_ORDERS)
        for k in range(r.shape[3]):
            out[(f"rish_l{2 * k}", float(b))] = float(transform.to_template(r[..., k])[wm].mean())
    return out


def scan_template_points(sc, shape) -> np.ndarray:
    """Brain phantom: each voxel's template (MNI) point of one scan, world mm
    of the study grid (X, Y, Z, 3): the person's known map (phantom seed,
    the study's field of view ``shape`` x 2.5 mm), as
    ``bench/harmonize_register_speed.py``'s ``truth_mm``."""
    from dmriflow.interfaces.sim import brain, phantom
    s = sc.subject
    grid = s.mask.shape
    ijk = np.indices(grid, dtype=np.float64).reshape(3, -1).T
    xyz = ijk @ np.asarray(s.affine)[:3, :3].T + np.asarray(s.affine)[:3, 3]
    fov = np.asarray(shape, dtype=np.float64) * U.STUDY_VOXEL_MM
    m, _ = brain.to_template(xyz, fov, phantom.subject_parameters(sc.person.seed),
                             sc.person.seed)
    return (m * brain.anatomy_scale(fov)).reshape(tuple(grid) + (3,)).astype(np.float32)


def registration_truth(test, ref, tar, held_ref, held, tpl, shape) -> str:
    """Registration accuracy of the held-out scans against the known warps:
    each scan's template points pulled to the template by its transform
    (``mapped``; a perfect registration maps every scan's same anatomy to a
    template voxel). ``gap``: mean distance (mm) between a person's site-A and
    site-B mapped points (median over persons; the site effect's share of the
    misregistration); ``spread``: per site, the RMS distance of the persons'
    mapped points from their mean (mean over voxels). Voxels: template
    voxels inside the template and every compared scan's warped mask."""
    def mapped(sc, t):
        pts = scan_template_points(sc, shape)
        m = np.stack([t.to_template(pts[..., k]) for k in range(3)], axis=-1)
        return m, t.to_template(sc.subject.mask.astype(np.float32)) > 0.99
    a = [mapped(sc, t) for sc, t in zip(test[ref], held_ref)]
    b = [mapped(sc, t) for sc, t in zip(test[tar], held)]
    inside = (tpl > 0) & np.all([m for _, m in a + b], axis=0)
    gaps = [float(np.linalg.norm(pa[inside] - pb[inside], axis=1).mean())
            for (pa, _), (pb, _) in zip(a, b)]

    def spread(items):
        pts = np.stack([p[inside] for p, _ in items])
        return float(np.sqrt(np.mean(np.sum((pts - pts.mean(axis=0)) ** 2, axis=2))))
    return (f"gap A-B {np.median(gaps):.3f} mm (max {max(gaps):.3f}); spread A "
            f"{spread(a):.3f} / B {spread(b):.3f} mm ({int(inside.sum())} voxels)")


def blurred(img, affine, sd_mm: float) -> np.ndarray:
    """``img`` blurred by an isotropic Gaussian of SD ``sd_mm`` (the discrete
    kernel of ``harmonize.resolution_matched``), float32: ``--blur-all-sd``."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return H.discrete_gaussian_blur(img, [sd_mm / float(z) for z in zooms])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-fit", type=int, default=12)
    ap.add_argument("--n-held-out", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anatomy", default="brain", choices=("geometric", "brain"))
    ap.add_argument("--shape", type=int, nargs=3, default=[28, 34, 26])
    ap.add_argument("--target-voxel", type=float, default=U.SITE_B.voxel_mm)
    ap.add_argument("--target-snr", type=float, default=U.SITE_B.snr)
    ap.add_argument("--lmax", type=int, default=U.STUDY_LMAX, help="harmonization lmax")
    ap.add_argument("--reference-snr", type=float, default=U.SITE_A.snr)
    ap.add_argument("--reference-te", type=float, default=U.SITE_A.te_ms,
                    help="site A's echo time (ms; default the phantom's)")
    ap.add_argument("--target-te", type=float, default=U.SITE_B.te_ms,
                    help="site B's echo time (ms; default the phantom's)")
    ap.add_argument("--template-eval", action="store_true",
                    help="also evaluate in template space: every held-out scan's maps warped "
                         "to the template, means over the engine's template white matter "
                         "(harmonize.template_wm_mask: the fit's reference subjects' mean FA "
                         ">= WM_FA_THRESHOLD in the template mask), the same at both sites")
    ap.add_argument("--share-transforms", action="store_true",
                    help="equal grids only: a person's site-B scans use the transform of their "
                         "site-A scan (paired fit and held-out), so registration cannot differ "
                         "between the sites")
    ap.add_argument("--variants", nargs="+", default=list(H.SCALE_ESTIMATORS))
    ap.add_argument("--contrasts", nargs="+", default=[H.DEFAULT_REGISTRATION_CONTRAST],
                    choices=H.REGISTRATION_CONTRASTS,
                    help="registration contrasts to compare (template, fit and held-out "
                         "registrations redone for each)")
    ap.add_argument("--refit-rounds", type=int, nargs="+", default=[H.DEFAULT_REFIT_ROUNDS],
                    help="refit rounds to compare (target scans re-registered through their "
                         "harmonised FA; held-out scans too, in apply)")
    ap.add_argument("--signal-eval", action="store_true",
                    help="also evaluate the signal: every held-out scan's noise-free data "
                         "(harmonised with the same artefact and transform), the site rows "
                         "of their RISH/FA/MD")
    ap.add_argument("--noise-floor", type=int, nargs="+", default=[0], choices=(0, 1),
                    help="fit without (0) / with (1) the RISH noise floor removed from the "
                         "site means (fit_harmonization(noise_floor=...); 'ratio' and "
                         "'nearest' only)")
    ap.add_argument("--tissue-pool-fwhm", type=float, nargs="+",
                    default=[H.DEFAULT_TISSUE_POOL_FWHM_MM],
                    help="FWHM (mm) of the tissue-guided pooling of the site means to compare "
                         "(fit_harmonization(tissue_pool_fwhm_mm=...); 0 = off)")
    ap.add_argument("--match-resolution", nargs="+", default=["off"],
                    type=lambda v: float(v) if v[:1].isdigit() else v,
                    help="resolution-matched registration rules to compare (register_fa("
                         "match_resolution=...): a subject with coarser voxels than the "
                         "template registered to the template blurred to its resolution; only "
                         "the registrations of such subjects are redone): off, "
                         f"{', '.join(H.RESOLUTION_MATCH_RULES)} or a number, the rule's "
                         "factor k itself (a diagnostic)")
    ap.add_argument("--blur-all-sd", type=float, default=0.0,
                    help="control (mm, 0 = off): every scan, reference and target, fit and "
                         "held-out, registered to the template blurred by an isotropic "
                         "Gaussian of this SD (discrete kernel), the template itself unchanged; "
                         "0.829 = box-linear's blur for 3 mm on 2.5 mm, on every scan")
    opts = ap.parse_args()
    rules = [None if r == "off" else r for r in opts.match_resolution]
    for r in rules:
        if r is not None:
            H.resolution_match_sigma(np.eye(4), np.eye(4), r)    # refuses an unknown rule
    t0 = time.perf_counter()
    sites = (replace(U.SITE_A, snr=opts.reference_snr, te_ms=opts.reference_te),
             replace(U.SITE_B, voxel_mm=opts.target_voxel, snr=opts.target_snr,
                     te_ms=opts.target_te))
    ref, tar = sites[0].name, sites[1].name
    kw = {"anatomy": opts.anatomy, "shape": tuple(opts.shape)}
    cohorts = {"unpaired": U.unpaired_study(opts.n_fit, opts.seed, sites, **kw)}
    cohorts["paired"] = {ref: cohorts["unpaired"][ref],
                         tar: [U.scan(sc.person, sites[1], **kw) for sc in cohorts["unpaired"][ref]]}
    test = U.held_out(opts.n_held_out, opts.seed, sites, **kw)
    b0 = H.B0_CONTRAST in opts.contrasts
    feats = {(d, s): U.features(c[s], opts.lmax, noise_floor=1 in opts.noise_floor, b0=b0)
             for d, c in cohorts.items() for s in (ref, tar)}
    m_ref = [U.measures(sc, lmax=opts.lmax) for sc in test[ref]]
    m_bef = [U.measures(sc, lmax=opts.lmax) for sc in test[tar]]
    if opts.signal_eval:
        s_ref = [U.measures(sc, sc.subject.noise_free, opts.lmax) for sc in test[ref]]
        s_bef = [U.measures(sc, sc.subject.noise_free, opts.lmax) for sc in test[tar]]
    shells = list(U.STUDY_SHELLS)
    ref_cache = {}
    print(f"data {time.perf_counter() - t0:.0f} s, load1 {load1()}", flush=True)
    held_feats = U.features(test[tar], b0=b0)
    held_ref_feats = U.features(test[ref], b0=b0)
    ref_affine = feats[("unpaired", ref)][0].affine    # the template's grid

    def coarser(items, rule) -> bool:
        """Any of ``items`` registered to a blurred template under ``rule``."""
        return rule is not None and any(
            np.any(H.resolution_match_sigma(f.affine, ref_affine, rule) > 0) for f in items)
    for contrast, rule in [(c, r) for c in opts.contrasts for r in rules]:
        t0 = time.perf_counter()

        site_scaled = contrast == H.SITE_SCALED_CONTRAST
        ropts = {"match_resolution": rule} if rule else {}

        def register(f, contrast=contrast, factors=None, sc=None, rule=rule):
            """``factors``: a target scan ``sc`` through its site-scaled FA."""
            img = (H.registration_image(f, contrast, shells) if factors is None else
                   H.masked_fa(f, H.site_scaled_fa(U.as_dwi(sc), factors, opts.lmax)))
            return H.register_fa(img, f.affine, tpl_static, tpl_aff, match_resolution=rule)
        # the template and the reference scans' registrations: redone for a rule
        # only where a reference scan is coarser than the template
        ref_key = (contrast, rule if coarser(feats[("unpaired", ref)] + held_ref_feats, rule)
                   else None)
        if ref_key not in ref_cache:
            tpl, tpl_aff, tpl_info = H.build_template(
                feats[("unpaired", ref)], contrast=contrast, shells=shells,
                registration_options=ropts if ref_key[1] else {})
            tpl_static = tpl if not opts.blur_all_sd else blurred(tpl, tpl_aff, opts.blur_all_sd)
            ref_reg = {}
            for f in (f for d in cohorts for f in feats[(d, ref)]):
                if f.subject not in ref_reg:
                    ref_reg[f.subject] = register(f)
            held_ref = ([register(f) for f in held_ref_feats]
                        if opts.template_eval or opts.share_transforms or opts.anatomy == "brain"
                        else [])
            ref_cache[ref_key] = (tpl, tpl_aff, tpl_info, ref_reg, held_ref)
        tpl, tpl_aff, tpl_info, ref_reg, held_ref = ref_cache[ref_key]
        tpl_static = tpl if not opts.blur_all_sd else blurred(tpl, tpl_aff, opts.blur_all_sd)
        # the global site factors of each design's fit cohort (fa-sitescaled only)
        factors = {d: H.site_scaling_factors(feats[(d, ref)], feats[(d, tar)], shells, opts.lmax)
                   for d in cohorts} if site_scaled else {d: None for d in cohorts}
        reg = dict(ref_reg)
        for d, c in cohorts.items():
            for sc, f in zip(c[tar], feats[(d, tar)]):
                if f.subject not in reg:
                    reg[f.subject] = register(f, factors=factors[d], sc=sc)
        # held-out target transforms per design (one set unless they depend on its factors)
        held_d = {d: [register(f, factors=factors[d], sc=sc)
                      for sc, f in zip(test[tar], held_feats)]
                  for d in (cohorts if site_scaled else ["unpaired"])}
        held_d.setdefault("paired", held_d["unpaired"])
        if opts.share_transforms:
            if opts.target_voxel != sites[0].voxel_mm:
                raise SystemExit("--share-transforms needs --target-voxel equal to site A's")
            for a, b in zip(feats[("paired", ref)], feats[("paired", tar)]):
                reg[b.subject] = reg[a.subject]
            held_d = {d: list(held_ref) for d in cohorts}
        print(f"setup {time.perf_counter() - t0:.0f} s, load1 {load1()}; seed {opts.seed}, "
              f"anatomy {opts.anatomy}, grid {opts.shape}, site A SNR {opts.reference_snr:g}, "
              f"site B {opts.target_voxel:g} mm SNR {opts.target_snr:g}"
              f"{'' if opts.reference_te is None and opts.target_te is None else ', TE A %s / B %s ms' % (opts.reference_te or phantom.HCP_TE_MS, opts.target_te or phantom.HCP_TE_MS)}"
              f"{', shared transforms' if opts.share_transforms else ''}; registration contrast "
              f"{contrast}{', resolution-matched (%s)' % (rule,) if rule else ''}"
              f"{', every scan to the template blurred SD %g mm' % opts.blur_all_sd if opts.blur_all_sd else ''}",
              flush=True)
        if opts.anatomy == "brain":
            for d in (cohorts if site_scaled else ["unpaired"]):
                print(f"  registration vs the known warps{f' ({d} factors)' if site_scaled else ''}"
                      f": " + registration_truth(test, ref, tar, held_ref, held_d[d], tpl,
                                                 opts.shape), flush=True)
        if site_scaled:
            for d in cohorts:
                print(f"  site factors ({d}): " + "; ".join(
                    f"b{b:g} " + " ".join(f"l{2 * k} {v:.4f}" for k, v in enumerate(g))
                    for b, g in factors[d].items()), flush=True)
        # the harmonised FA of each fit target scan, for the refit rounds
        hfa = {f.subject: (lambda art, t, sc=sc: H.harmonised_fa(U.as_dwi(sc), art, t))
               for d, c in cohorts.items() for sc, f in zip(c[tar], feats[(d, tar)])}
        for variant, rounds, floor, pool in [(v, r, n, w) for v in opts.variants
                                             for r in opts.refit_rounds
                                             for n in opts.noise_floor
                                             for w in opts.tissue_pool_fwhm
                                             # pooling refuses the per-subject estimators
                                             if not (w and v in H.NATIVE_ESTIMATORS)]:
            t1 = time.perf_counter()
            res, fit_s = {}, {}
            for d in cohorts:
                t2 = time.perf_counter()
                art = H.fit_harmonization(
                    feats[(d, ref)], feats[(d, tar)], list(U.STUDY_SHELLS), opts.lmax,
                    reference_site=ref, target_site=tar, template=(tpl, tpl_aff),
                    template_info=tpl_info, registered={k: (lambda t=t: t) for k, t in reg.items()},
                    scale_estimator=variant, refit_rounds=rounds, harmonised_fa=hfa,
                    registration_contrast=contrast, noise_floor=bool(floor),
                    tissue_pool_fwhm_mm=pool, registration_options=ropts)
                fit_s[d] = (time.perf_counter() - t2) / (2 * opts.n_fit)
                held = held_d[d]
                if site_scaled and not all(np.array_equal(art.site_factors[b], factors[d][b])
                                           for b in shells):
                    raise SystemExit("the artefact's site factors differ from the bench's")
                after = [H.apply_harmonization(U.as_dwi(sc), None, art, transform=t)[0]
                         for sc, t in zip(test[tar], held)]
                m_aft = [U.measures(sc, a, opts.lmax) for sc, a in zip(test[tar], after)]
                res[d] = (U.site_rows(m_ref, m_bef, m_aft), U.group_rows(test[tar], m_bef, m_aft),
                          min(m["fa_corr"] for m in m_aft))
                if opts.signal_eval:
                    s_aft = [U.measures(sc, H.apply_harmonization(
                        U.as_dwi(sc, sc.subject.noise_free), None, art, transform=t)[0],
                        opts.lmax) for sc, t in zip(test[tar], held)]
                    print(f"  [{variant} {d}{', noise floor removed' if floor else ''}, "
                          f"noise-free signal] " + before_after(U.site_rows(s_ref, s_bef, s_aft)),
                          flush=True)
                if opts.template_eval:
                    # the engine's definition: the fit's reference subjects' FA
                    # through their registrations (not the template image, which
                    # is not FA for the RISH contrasts)
                    wm = H.template_wm_mask([H.warped_fa(f, reg[f.subject])
                                             for f in feats[(d, ref)]], art.template_mask)
                    t_ref = [template_measures(sc, None, t, wm) for sc, t in zip(test[ref], held_ref)]
                    t_bef = [template_measures(sc, None, t, wm) for sc, t in zip(test[tar], held)]
                    t_aft = [template_measures(sc, a, t, wm)
                             for sc, a, t in zip(test[tar], after, held)]
                    rows = U.site_rows(t_ref, t_bef, t_aft)
                    print(f"  [{variant} refit {rounds} {d}, template-space WM "
                          f"({int(wm.sum())} voxels)] " + before_after(rows), flush=True)
            cells = []
            for i, row in enumerate(res["unpaired"][0]):
                name = row["metric"] + ("" if math.isnan(row["shell"]) else f" b{row['shell']:g}")
                cells.append(f"{name} " + " / ".join(
                    f"{res[d][0][i]['d_after']:.2f} ({100 * res[d][0][i]['rel_after']:+.1f} %, "
                    f"p {res[d][0][i]['p_after']:.2g})" for d in res))
            print(f"== {variant}, refit rounds {rounds}, contrast {contrast}"
                  f"{', resolution-matched (%s)' % (rule,) if rule else ''}"
                  f"{', all blurred SD %g mm' % opts.blur_all_sd if opts.blur_all_sd else ''}"
                  f"{', noise floor removed' if floor else ''}"
                  f"{', tissue-pooled site means FWHM %g mm' % pool if pool else ''} "
                  f"({time.perf_counter() - t1:.0f} s, "
                  f"load1 {load1()})")
            print("  " + "\n  ".join(cells))
            print("  max |d| " + " / ".join(f"{max(abs(r['d_after']) for r in res[d][0]):.2f}"
                                            for d in res)
                  + "; group FA / l2 ratio " + " / ".join(
                      f"{res[d][1][0]['ratio']:.3f}, {res[d][1][1]['ratio']:.3f}" for d in res)
                  + "; FA corr min " + " / ".join(f"{res[d][2]:.3f}" for d in res)
                  + "; maps from cached registrations (+ refit registrations) s/subject "
                  + " / ".join(
                      f"{fit_s[d]:.2f}" for d in res), flush=True)


if __name__ == "__main__":
    main()
