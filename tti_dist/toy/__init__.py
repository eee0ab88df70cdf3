"""Toy Models of Superposition (Elhage et al. 2022, "Toy Models of Superposition",
transformer-circuits.pub/2022/toy_model): a sweep over feature sparsity of many small
models x' = ReLU(W^T W x + b) trained in one batched tensor program, with the project's
regularizers as switches, and the superposition metrics of docs/metrics.md#superposition-in-toy-models;
and the n = 2, m = 1 phase diagram over sparsity and relative importance.

Modules: `config` (ToyConfig, YAML loading, validation), `model` (the batched model and its
training), `penalties` (L1 on the hidden vector, orthogonality of W's columns), `metrics`
(feature dimensionality D_i, dimensions per feature D*, represented features), `figures` (PNG
plots), `run` (train a sweep, then write the run directory), `phase` (phase classification,
exact expected loss and closed forms of the n = 2, m = 1 model), `phase_run` (train the phase
grid, then write the run directory). Results: docs/evaluation.md, docs/experiments/tms_phase.md.
The data come from `tti_dist.data.toy`.
"""
