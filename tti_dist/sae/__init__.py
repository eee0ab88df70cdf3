"""Tensor-parallel sparse autoencoder: sharded latents, distributed TopK, SAE metrics (docs/sae.md)."""

from tti_dist.sae.metrics import (
    ExplainedVarianceAccumulator,
    ce_loss_recovered,
    dead_fraction,
    decoder_redundancy,
    delta_lm_loss,
    dense_fraction,
    explained_variance,
    kl_score,
    l0,
    latent_density,
    shrinkage,
)
from tti_dist.config.sae import SAEConfig
from tti_dist.sae.firing_tracker import FiringTracker
from tti_dist.sae.model import ParallelSAE, SAEOutput

__all__ = [
    "ExplainedVarianceAccumulator",
    "FiringTracker",
    "ParallelSAE",
    "SAEConfig",
    "SAEOutput",
    "ce_loss_recovered",
    "dead_fraction",
    "decoder_redundancy",
    "delta_lm_loss",
    "dense_fraction",
    "explained_variance",
    "kl_score",
    "l0",
    "latent_density",
    "shrinkage",
]
