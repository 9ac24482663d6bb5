"""Option values of RISH harmonization, declared once and importing nothing
heavy: the library (:mod:`.harmonize`) and the command line
(:mod:`.steps.harmonization_fit`, which must not import numpy) both use them.
"""

from __future__ import annotations

#: Registration kinds: full (affine + SyN), affine only, or none (subjects
#: already on the template grid).
REGISTRATIONS = ("syn", "affine", "identity")
#: The image every subject is registered to the template through (and the
#: template is built from; docs/harmonization.md, "Registration contrast"):
#: "fa": DTI FA in the brain mask. The site effect (a per-order scaling of
#: the SH) changes FA non-linearly (+11 % in white matter, +21 % in grey
#: matter on the study's site B), so SyN maps the target site's anatomy
#: slightly differently from the same anatomy at the reference site.
#: "rish-l2": ``sqrt(RISH_l2)`` of the lowest harmonised shell (the
#: b0-normalised anisotropic signal);
#: "rish-l0": ``sqrt(RISH_l0)`` of that shell (the mean diffusion-weighted
#: signal over b0: no anisotropy, little noise). A per-order site scaling
#: multiplies each by a constant, which the metrics ignore (mutual
#: information, local cross-correlation).
#: "rish-l0l2": the mean of the two images above, each over its own median
#: (so still exactly invariant to a per-order site scaling): the mean
#: signal's low-noise shape with the anisotropic signal's white-matter
#: contrast, in one image for both the affine stage and SyN.
#: "fa-sitescaled": the reference site registers through its FA (the
#: template is built from it, as for "fa"); a target subject through the FA
#: of its DWI after one global scaling of its SH per order and shell,
#: ``g_l,b = sqrt(reference site mean / target site mean)`` of the
#: subjects' brain-mask mean RISH_l,b (no registration needed, so no
#: misregistration carried; recorded in the artefact). It removes the site
#: effect's global share of FA's contrast change before registration; the
#: scale maps are still fitted from the original RISH. Library only: the
#: target subjects' DWI must reach the fit (``fit_harmonization(
#: site_scaled_fa=...)``); the engine refuses it (``LIBRARY_ONLY_CONTRASTS``).
#: Measured (bench/harmonize_bias.py, against FA re-run beside it): brain
#: largest |d| 0.75 / 0.75 -> 0.46 / 0.46 (seed 0) and 0.85 / 0.70 -> 0.61 /
#: 0.45 (seed 100), the noise-free paired residual gone (0.04, as with
#: shared transforms); but less group effect than FA in every brain cell
#: (up to -0.043) and geometric seed 0 worse (0.26 -> 0.37 paired), so an
#: option, not the default.
#: "b0": the mean of the subject's b0 volumes (T2-weighted, the contrast
#: many pipelines register dMRI through) over its median in the mask. The
#: simulated site effect scales the b0-normalised signal only, so it leaves
#: this image unchanged; a real site's TE/TR change its tissue contrast
#: (site B at TE 60 against 89.5 ms: grey/white 1.51 -> 1.34). Measured
#: (bench/harmonize_bias.py, FA beside it): it registers far worse on the
#: phantoms (brain seed 0: known-warp gap A-B 0.50 -> 2.03 mm, spread of the
#: reference persons 0.41 -> 1.36 mm; white matter has one T2/PD, so no
#: structure inside it: CV 0.16 against FA's 0.32) and leaves a larger,
#: significant residual (largest |d| 0.76 / 0.76 -> 1.46 / 1.66 brain seed 0,
#: 0.41 / 0.29 -> 1.49 / 1.58 geometric; 3.58 / 3.69 with the TE
#: difference): rejected, kept so the study reproduces. Library only: the
#: engine's features nodes do not save the mean b0.
#: Not kept: ``sqrt(RISH_l2 / RISH_l0)`` (FA-like): its low-signal voxels
#: reach 10-14 x its median, and SyN on it did not reproduce (a 0.1 %
#: intensity jitter moved the transform 0.07 mm, an exact site scaling 0.23
#: mm; docs/harmonization.md).
REGISTRATION_CONTRASTS = ("fa", "rish-l2", "rish-l0", "rish-l0l2", "fa-sitescaled", "b0")
#: Contrasts the engine (``dmriflow harmonize fit``) does not run, and why:
#: its per-subject registration nodes see the features nodes' files (FA,
#: mask, RISH), not the DWI a site-scaled FA is fitted from nor a mean b0.
LIBRARY_ONLY_CONTRASTS = {
    "fa-sitescaled": "the target subjects' DWI must reach their registration (a site-scaled "
                     "FA), which the per-subject nodes do not have; fit it with the library "
                     "(fit_harmonization with site_scaled_fa)",
    "b0": "the features nodes do not save the mean b0; fit it with the library "
          "(subject_features(..., b0=True), fit_harmonization)",
}
#: The contrasts ``dmriflow harmonize fit`` offers.
ENGINE_REGISTRATION_CONTRASTS = tuple(c for c in REGISTRATION_CONTRASTS
                                      if c not in LIBRARY_ONLY_CONTRASTS)
DEFAULT_REGISTRATION_CONTRAST = "fa"
#: Resolution-matched registration: the rules of the template's blur for a
#: subject whose voxels are coarser than the template's (their factors are
#: ``harmonize.RESOLUTION_MATCH_RULES``; docs/harmonization-studies.md has
#: the rows). ``dmriflow harmonize fit --match-resolution`` offers them and
#: ``RESOLUTION_MATCH_OFF``, its default: every subject registered to the
#: template as it is. The rule is recorded in the artefact, and apply
#: registers with it.
RESOLUTION_MATCH_RULE_NAMES = ("box", "box-linear", "fwhm")
RESOLUTION_MATCH_OFF = "off"
ENGINE_RESOLUTION_MATCH = (RESOLUTION_MATCH_OFF, *RESOLUTION_MATCH_RULE_NAMES)


def resolution_match_rule(choice: str) -> str | None:
    """The ``match_resolution`` of :func:`harmonize.register_fa` for an
    engine choice: None for ``RESOLUTION_MATCH_OFF``, else the rule."""
    return None if choice == RESOLUTION_MATCH_OFF else choice
