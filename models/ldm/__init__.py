"""3T->7T RISH generation with latent diffusion (SCIENCE.md section 4).

Importing the package registers the checkpointable networks with
:mod:`dmriflow.models.card`: ``"ldm-3t7t"`` (:mod:`.model`) and the CNN
baseline ``"cnn-3t7t"`` (:mod:`.baselines`).
"""

from dmriflow.models.ldm import baselines, model  # noqa: F401  (registration)
