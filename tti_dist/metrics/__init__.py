"""Metric output of the training loop: TensorBoard events and a Parquet table on rank 0."""

from tti_dist.metrics.metrics_table import PARQUET_NAME, metrics_path, read_metrics
from tti_dist.metrics.metrics_writer import MetricsWriter, NullMetricsWriter, open_metrics_writer
from tti_dist.metrics.tensorboard_sink import TB_DIRNAME

__all__ = [
    "PARQUET_NAME",
    "TB_DIRNAME",
    "MetricsWriter",
    "NullMetricsWriter",
    "metrics_path",
    "open_metrics_writer",
    "read_metrics",
]
