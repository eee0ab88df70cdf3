"""What a sweep leaves on disk, turned into reports: files only, no Ray.

`tti report DIR` (`sweep_report.write_report`) reads the trial records (`records`), picks the
interpretability metrics (`interp_metrics`), computes the Pareto frontiers and the
interpretability tax (`pareto`) with its noise floor and the baselines' convergence checks
(`noise`), and writes the figures (`plots`) and report.md (`markdown`). For TensorBoard,
each trial records its hparams and the sweep's side-by-side chart layout (`tensorboard`),
and `tti tensorboard DIR` serves the sweep (`tensorboard_server`).
"""
