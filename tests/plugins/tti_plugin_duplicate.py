"""A plugin that registers a settings class under a built-in type name (`l1`): importing it
must be refused with a one-line error naming the type and the module that registered it first."""

from __future__ import annotations

from dataclasses import dataclass

from tti_dist.config.regularizers import RegularizerTypeConfig, register_config


@register_config
@dataclass(frozen=True)
class AnotherL1Config(RegularizerTypeConfig):
    """Claims the built-in `l1` type name."""

    type_name = "l1"
