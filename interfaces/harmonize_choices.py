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
#: Not kept: ``sqrt(RISH_l2 / RISH_l0)`` (FA-like): its low-signal voxels
#: reach 10-14 x its median, and SyN on it did not reproduce (a 0.1 %
#: intensity jitter moved the transform 0.07 mm, an exact site scaling 0.23
#: mm; docs/harmonization.md).
REGISTRATION_CONTRASTS = ("fa", "rish-l2", "rish-l0", "rish-l0l2")
DEFAULT_REGISTRATION_CONTRAST = "fa"
