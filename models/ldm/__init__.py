"""3T->7T RISH generation with latent diffusion (SCIENCE.md section 4).

Importing the package registers the checkpointable networks with
:mod:`dmriflow.models.card`: ``"ldm-3t7t"`` (:mod:`.model`) and the CNN
baseline ``"cnn-3t7t"`` (:mod:`.baselines`), the RISH-space residual diffusion
``"rish-diffusion-3t7t"`` and its equally-fed CNN ``"rish-cnn-3t7t"`` (:mod:`.rishdiff`),
and the class-conditioned latent DDPM ``"ldm-faithful-3t7t"`` (:mod:`.faithful`).
"""

from dmriflow.models.ldm import baselines, faithful, model, rishdiff  # noqa: F401  (registration)
