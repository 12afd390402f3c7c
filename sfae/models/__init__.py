"""Anomaly localization methods, registered by name: SFAE, the baselines and the Random floor.

Importing this package registers every method module, so
:func:`build_method` finds a method by the name used in the config.
"""

from sfae.models import ae_mse, ae_ssim, bm, dfr, fanogan, fpi, pii, random_scores, sfae, vae  # noqa: F401  (each module registers its method)
from sfae.models.base import METHODS, AnomalyMethod, Prediction, build_method, register

__all__ = ["METHODS", "AnomalyMethod", "Prediction", "build_method", "register"]
