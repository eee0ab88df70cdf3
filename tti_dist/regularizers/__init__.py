"""Interpretability regularizers: one module per type, registered by type name.

Importing this package registers every built-in type (see base.REGISTRY); their settings
classes are registered in tti_dist.config.regularizers.
"""

# Importing the modules registers their types.
from tti_dist.regularizers import (  # noqa: F401
    decorrelation, kl, l1, orthogonality, routing, sae, total_correlation, transcoder,
)
from tti_dist.regularizers.base import REGISTRY, Regularizer, build_regularizers, register
from tti_dist.regularizers.validation import check_regularizers, checked_regularizers, validate_run_config

__all__ = [
    "REGISTRY", "Regularizer", "build_regularizers", "check_regularizers", "checked_regularizers", "register",
    "validate_run_config",
]
