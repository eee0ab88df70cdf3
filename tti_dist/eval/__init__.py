"""Evaluate trained checkpoints: `tti eval` (capability and interpretability metrics) and
`tti inspect` (top-activating contexts of a unit or SAE latent)."""
