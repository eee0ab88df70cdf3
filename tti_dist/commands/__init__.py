"""One module per `tti` verb. Each has `main(args) -> exit code`; the verbs that start
processes first run a `prepare_*` step (load and validate everything, before any process
or process group exists: a user error is one line and exit code 2), then launch the ranks.

`tti_dist.cli` builds the argument parser and imports the verb's module on dispatch, so a
command loads only its own dependencies (megatron-core for the rank-running verbs, Ray for
sweep and submit).
"""
