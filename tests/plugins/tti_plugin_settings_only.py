"""A plugin that registers a regularizer type's settings but forgets its Regularizer class."""

from __future__ import annotations

from dataclasses import dataclass

from tti_dist.config.regularizers import RegularizerTypeConfig, register_config


@register_config
@dataclass(frozen=True)
class SettingsOnlyConfig(RegularizerTypeConfig):
    type_name = "settings_only"
    uses_hookpoints = False
