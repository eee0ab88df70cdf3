"""Interpretability regularizers: one module per type, registered by type name.

Importing this package registers every built-in type (see base.REGISTRY).
"""

# Importing the modules registers their types.
from tti_dist.regularizers import decorrelation, kl, l1, orthogonality, routing, sae, total_correlation  # noqa: F401
from tti_dist.regularizers.base import (
    REGISTRY,
    Regularizer,
    RegularizerSpec,
    build_regularizers,
    parse_specs,
    register,
)
from tti_dist.regularizers.schedule import ScheduleConfig

__all__ = ["REGISTRY", "Regularizer", "RegularizerSpec", "ScheduleConfig", "build_regularizers", "parse_specs", "register"]
