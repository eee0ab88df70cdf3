"""Toy Models of Superposition (Elhage et al. 2022, "Toy Models of Superposition",
transformer-circuits.pub/2022/toy_model): a sweep over feature sparsity of many small
models x' = ReLU(W^T W x + b) trained in one batched tensor program, with the project's
regularizers as switches, and the superposition metrics of docs/metrics.md#superposition-in-toy-models.

Modules: `config` (ToyConfig, YAML loading, validation), `model` (the batched model and its
training), `penalties` (L1 on the hidden vector, orthogonality of W's columns), `metrics`
(feature dimensionality D_i, dimensions per feature D*, represented features), `figures` (PNG
plots), `run` (train, then write the run directory). Results: docs/evaluation.md.
The data come from `tti_dist.data.toy`.
"""
