"""Metric output of the training loop: TensorBoard events and a Parquet table on rank 0."""

from tti_dist.metrics.sinks import (
    PARQUET_NAME,
    TB_DIRNAME,
    MetricsWriter,
    NullMetricsWriter,
    metrics_path,
    open_metrics_writer,
    read_metrics,
)

__all__ = [
    "PARQUET_NAME",
    "TB_DIRNAME",
    "MetricsWriter",
    "NullMetricsWriter",
    "metrics_path",
    "open_metrics_writer",
    "read_metrics",
]
