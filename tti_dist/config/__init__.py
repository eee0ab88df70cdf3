"""Run configuration: typed schema, YAML loading with overrides, validation."""

from tti_dist.config.load import apply_override, config_from_dict, config_to_dict, dump_config, load_config
from tti_dist.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    ZeroConfig,
)
from tti_dist.config.validate import ignored_settings, validate_config

__all__ = [
    "CheckpointConfig", "DataConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "RunConfig", "TrainConfig", "ZeroConfig", "apply_override",
    "config_from_dict", "config_to_dict", "dump_config", "ignored_settings", "load_config", "validate_config",
]
