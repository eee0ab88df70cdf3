"""The `tti` command line.

    tti train CONFIG [--set k=v ...] [--run-dir RUN] [--nproc N] [--resume]
    tti export RUN --out model.safetensors [--checkpoint STEP|TAG]
    tti export RUN --format hf --out DIR [--checkpoint STEP|TAG]
    tti data build SOURCE --out DIR [--tokenizer byte|bpe|FILE.json] [--vocab-size N] [--workers N] [...]
    tti data synth factored --out DIR [--config FILE] [--set key=value ...]
    tti data info DIR
    tti sae fit RUN --site SITE --latents N [--k K] [--activation A] [--target SITE [--skip]] [--checkpoint STEP] [--steps S] [--lr LR] [--out DIR] [--seed S] [--nproc P]
    tti sae export RUN|FIT_DIR --out DIR [--checkpoint STEP|TAG] [--name ENTRY]
    tti sweep SWEEP [--address ADDR] [--out DIR] [--set k=v ...]
    tti toy CONFIG --run-dir RUN [--set key=value ...] [--overwrite]
    tti eval RUN [--checkpoint STEP] [--data DIR ...] [--weights FILE] [--nproc P] [--batches B] [--max-tokens N]
    tti inspect RUN --site SITE --unit U [--top N] [--checkpoint STEP] [--batches B] [--context C] [--sae DIR]
    tti circuit RUN --task TASK [--checkpoint STEP] [--batches B] [--steps S] [--lambdas L,...] [--target-loss X] [--out FILE] [...]
    tti tensorboard DIR [--port P] [--host 127.0.0.1]
    tti report DIR [--metric TAG ...] [--target VALUE]
    tti submit CONFIG_OR_SWEEP --address http://HEAD:8265 [--out DIR] [--set k=v ...] [--working-dir DIR] [--runtime-env FILE] [--wait]
    tti jobs status|stop JOB --address http://HEAD:8265
    tti jobs logs JOB --address http://HEAD:8265 [--follow]

User errors (bad config, bad paths, layout mismatches) print one line, `tti: error: ...`,
with no traceback, and exit with code 2 before any process group starts.

This module only builds the parser and dispatches: each verb is a module of
tti_dist.commands with `main(args)`, imported when the verb runs (so `tti report` never
loads megatron-core, and `tti train` never loads Ray).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tti_dist.config.schema import DataConfig
from tti_dist.errors import EXIT_RUN_FAILED, EXIT_USER_ERROR, ConfigError, RunWriteError
from tti_dist.utils.logging import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tti", description="Distributed training-time interpretability.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on this machine (N local ranks)")
    train.add_argument("config", help="YAML run config (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.steps=20 (repeatable)")
    train.add_argument("--run-dir", help="output directory (default: runs/<config name>-<time>)")
    train.add_argument("--nproc", type=int, help="local processes (default: parallel.tp_size * parallel.dp_size)")
    train.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoint")

    export = sub.add_parser("export", help="write consolidated weights (TP shards merged) as safetensors")
    export.add_argument("run_dir", metavar="RUN", help="run directory written by tti train")
    export.add_argument("--out", required=True,
                        help="output: a .safetensors file (--format tti), or a directory (--format hf)")
    export.add_argument("--format", choices=("tti", "hf"), default="tti",
                        help="tti: tti_dist's own consolidated safetensors (default); hf: a transformers model "
                             "directory (GPT-2 or GPT-NeoX architecture, docs/interop.md)")
    export.add_argument("--checkpoint", help="step or tag (default: latest)")

    data = sub.add_parser("data", help="build and inspect datasets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="tokenize a text source into an Arrow dataset")
    build.add_argument("source", help="'stdlib', 'shakespeare', a text file, a directory, a .jsonl, .parquet or .arrow file")
    build.add_argument("--out", required=True, help="dataset directory to create")
    build.add_argument("--tokenizer", default="byte", metavar="byte|bpe|FILE.json",
                       help="byte (257 ids), bpe (trained on a sample of the train split), or a HuggingFace "
                            "tokenizers .json file used as is (default byte)")
    build.add_argument("--vocab-size", type=int, help="BPE vocabulary size (required with --tokenizer bpe)")
    build.add_argument("--eos-token", metavar="TEXT",
                       help="end-of-document token of a --tokenizer .json file (default: the first of "
                            "<|endoftext|>, <|end_of_text|>, </s>, <eos>, <|eos|> among its special tokens)")
    build.add_argument("--bpe-sample-bytes", type=int, default=DataConfig.bpe_sample_bytes,
                       help="bytes of train text BPE is trained on, the first in source order "
                            f"(default {DataConfig.bpe_sample_bytes:,}, as data.bpe_sample_bytes)")
    build.add_argument("--workers", type=int, default=1,
                       help="tokenizing processes (default 1: tokenize in this process); the dataset is "
                            "byte-identical for any number")
    build.add_argument("--buffer-bytes", type=int,
                       help="document text read ahead of the shard writer, the build's memory bound besides "
                            "two shard buffers (default 8 MiB)")
    build.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction,
                       help=f"share of documents held out (default {DataConfig.val_fraction}, as data.val_fraction)")
    build.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    build.add_argument("--max-bytes", type=int, help="read at most this many bytes of the source")
    build.add_argument("--shard-tokens", type=int, default=16_777_216, help="tokens per shard file")
    build.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")

    synth = data.add_parser("synth", help="generate a synthetic corpus with ground-truth factors")
    synth.add_argument("kind", choices=["factored"], help="generative process (see docs/data.md)")
    synth.add_argument("--out", required=True, help="dataset directory to create")
    synth.add_argument("--config", help="YAML file with generator settings (see docs/data.md)")
    synth.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a generator setting, e.g. --set num_documents=2000 (repeatable)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")

    sae = sub.add_parser("sae", help="sparse autoencoders on a trained run").add_subparsers(
        dest="sae_command", required=True)
    fit = sae.add_parser("fit", help="train an SAE (TopK by default) on a run's frozen activations and write its "
                          "splice metrics")
    fit.add_argument("run_dir", metavar="RUN", help="run directory written by tti train")
    fit.add_argument("--site", required=True, action="append",
                     help="replicated hookpoint, e.g. blocks.1.resid_post; repeat to fit one SAE per site "
                          "and measure them spliced in together")
    fit.add_argument("--latents", type=int, required=True, help="SAE latents (divisible by the run's tp_size)")
    fit.add_argument("--k", type=int, help="active latents per token (topk; mean per token for batchtopk and "
                     "matryoshka), 1..latents; required for those, unused by relu and jumprelu")
    fit.add_argument("--activation", default="topk",
                     help="topk (default), relu, batchtopk, jumprelu or matryoshka (docs/sae.md)")
    fit.add_argument("--l1-coefficient", help="relu: weight of the decoder-norm-weighted L1 penalty (default 5.0)")
    fit.add_argument("--l0-coefficient", help="jumprelu: weight of the L0 penalty (default 1e-3)")
    fit.add_argument("--matryoshka-prefixes", metavar="M1,M2,...",
                     help="matryoshka: nested dictionary sizes, increasing, ending at --latents, e.g. 256,1024")
    fit.add_argument("--target", help="fit a transcoder instead: --site blocks.<i>.resid_mid (the MLP's input) "
                     "predicting --target blocks.<i>.mlp.out (its output)")
    fit.add_argument("--skip", action="store_true", help="with --target: a skip transcoder (adds W_skip x)")
    fit.add_argument("--checkpoint", help="step or tag (default: latest)")
    fit.add_argument("--steps", type=int, default=500, help="SAE optimizer steps (default 500)")
    fit.add_argument("--lr", type=float, default=1e-3, help="SAE Adam learning rate (default 1e-3)")
    fit.add_argument("--out", help="output directory (default: RUN/sae_fit/<site>-n<N>-k<K>)")
    fit.add_argument("--seed", type=int, default=0, help="SAE initialisation seed (default 0)")
    fit.add_argument("--nproc", type=int, help="local processes (default: the run's world size; a multiple of tp_size)")
    sae_export = sae.add_parser("export", help="write a co-trained or fitted SAE in SAELens's on-disk format")
    sae_export.add_argument("source", metavar="RUN|FIT_DIR",
                            help="a run directory (its `type: sae` regularizer entry) or a tti sae fit output directory")
    sae_export.add_argument("--out", required=True, help="directory to create (must not exist)")
    sae_export.add_argument("--checkpoint", help="RUN only: step or tag (default: latest)")
    sae_export.add_argument("--name", help="RUN only: the `type: sae` entry, when the config has several")

    ev = sub.add_parser("eval", help="score a checkpoint: capability and interpretability metrics")
    ev.add_argument("run_dir", metavar="RUN", help="run directory written by tti train")
    ev.add_argument("--checkpoint", help="step or tag (default: latest)")
    ev.add_argument("--data", action="append", default=[], metavar="DIR",
                    help="another dataset directory to report loss/perplexity on (repeatable)")
    ev.add_argument("--weights", help="evaluate an exported .safetensors (tti export) instead of a checkpoint")
    ev.add_argument("--nproc", type=int, help="ranks (default: the run's tp_size; 1 with --weights)")
    ev.add_argument("--batches", type=int,
                    help="validation micro-batches per dataset (default: the run's train.eval_batches x dp_size, "
                         "the windows its eval read)")
    ev.add_argument("--max-tokens", type=int, default=4096,
                    help="tokens whose activations feed the interpretability metrics (default 4096)")

    insp = sub.add_parser("inspect", help="top-activating contexts of a unit or SAE latent")
    insp.add_argument("run_dir", metavar="RUN", help="run directory written by tti train")
    insp.add_argument("--site", required=True, help="hookpoint, e.g. blocks.1.mlp.act")
    insp.add_argument("--unit", type=int, required=True, help="unit (or SAE latent) index over the whole width")
    insp.add_argument("--top", type=int, default=20, help="contexts to show (default 20)")
    insp.add_argument("--checkpoint", help="step or tag (default: latest)")
    insp.add_argument("--batches", type=int, default=8, help="validation micro-batches to search (default 8)")
    insp.add_argument("--context", type=int, default=12, help="tokens of left context (default 12)")
    insp.add_argument("--sae", help="a tti sae fit output directory: inspect its latent --unit instead")

    circ = sub.add_parser("circuit", help="circuit size by pruning node masks (Gao et al. 2025), with controls at "
                          "initialisation and on random labels (docs/circuits.md)")
    circ.add_argument("run_dir", metavar="RUN", help="run directory written by tti train (on the synthetic corpus)")
    circ.add_argument("--task", required=True, help="verb_number or topic (docs/circuits.md)")
    circ.add_argument("--checkpoint", help="step or tag (default: latest)")
    circ.add_argument("--batches", type=int, default=4, help="validation micro-batches of task examples (default 4)")
    circ.add_argument("--steps", type=int, default=100, help="mask optimizer steps per penalty (default 100)")
    circ.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of the mask logits (default 0.1)")
    circ.add_argument("--lambdas", metavar="L,...",
                      help="penalties on the fraction of nodes kept, nats, one search each (default 0.1)")
    circ.add_argument("--target-loss", type=float,
                      help="task loss the circuit must reach (default: the trained model's full task loss + 0.05)")
    circ.add_argument("--nodes", default="mlp,attn,resid", help="node types to mask (default mlp,attn,resid)")
    circ.add_argument("--ablation", default="mean", help="pruned nodes: mean (default, as the paper) or zero")
    circ.add_argument("--seed", type=int, default=0, help="seed of the random-label permutation (default 0)")
    circ.add_argument("--out", help="also write the JSON result to this file")

    toy = sub.add_parser("toy", help="Toy Models of Superposition: a sparsity sweep of batched toy models, or the "
                         "sparsity x importance phase diagram (the config's `experiment`)")
    toy.add_argument("config", help="YAML toy config (e.g. configs/toy_superposition.yaml, "
                                    "configs/toy_phase_diagram.yaml, configs/toy_dimensionality.yaml)")
    toy.add_argument("--run-dir", required=True, help="output directory (toy.parquet, summary.json, figures/)")
    toy.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a toy setting, e.g. --set steps=500 or --set topk_hidden=2 (repeatable)")
    toy.add_argument("--overwrite", action="store_true", help="replace the outputs of an existing run directory")

    report = sub.add_parser("report", help="summary table, Pareto frontiers and interpretability tax of a sweep")
    report.add_argument("sweep_dir", metavar="DIR", help="output directory of tti sweep (--out)")
    report.add_argument("--metric", dest="metrics", action="append", default=[], metavar="TAG",
                        help="headline interpretability metric, e.g. interp/blocks.1.mlp.act/l0 (repeatable; "
                             "default: the last block's mlp.act l0_frac, or another width-independent metric; docs/report.md)")
    report.add_argument("--target", type=float, metavar="VALUE",
                        help="interpretability level of the tax, in the metric's units (default: the most "
                             "interpretable level every model size reaches with every seed)")

    tboard = sub.add_parser("tensorboard", help="serve TensorBoard on a sweep, a run or any logdir (loopback)")
    tboard.add_argument("dir", metavar="DIR",
                        help="a tti sweep --out directory (serves DIR/runs), a run directory or any logdir")
    tboard.add_argument("--port", type=int, default=6006, help="TCP port (default 6006; 0 = a free port)")
    tboard.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: reach it from elsewhere with ssh -L)")

    sweep = sub.add_parser("sweep", help="run a sweep (model sizes x settings x seeds) on Ray Tune + Ray Train")
    sweep.add_argument("sweep", metavar="SWEEP", help="sweep YAML (see configs/sweeps/) or a run config (one trial)")
    sweep.add_argument("--address", help="join this Ray cluster ('auto' or HOST:PORT); default: an embedded local Ray")
    sweep.add_argument("--out", help="output directory (default: sweeps/<name>-<time>)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value in every trial, e.g. --set train.steps=20 (repeatable)")

    info = data.add_parser("info", help="summarize a dataset (and verify its shards)")
    info.add_argument("path", help="dataset directory")
    info.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the shards")
    addr_help = ("the cluster's Ray dashboard (Jobs API) address, http://HEAD:8265 or HEAD:8265 "
                 "(default: $RAY_API_SERVER_ADDRESS)")
    submit = sub.add_parser("submit", help="run a sweep or run config on a Ray cluster as a Ray Job")
    submit.add_argument("config", metavar="CONFIG_OR_SWEEP", help="sweep YAML (has `axes`) or run config")
    submit.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), help=addr_help)
    submit.add_argument("--out", help="sweep output directory on the cluster (default: sweeps/<stem>-<time> inside "
                                      "the job's working directory, deleted eventually; pass an absolute path on "
                                      "shared storage)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every trial (repeatable)")
    submit.add_argument("--working-dir", help="directory shipped to the cluster; must contain the file "
                                              "(default: the current directory)")
    submit.add_argument("--runtime-env", metavar="FILE",
                        help="YAML mapping merged over the job's runtime_env (e.g. cluster/runtime_env.yaml)")
    submit.add_argument("--wait", action="store_true",
                        help="follow the job's output until it ends; exit 0 when it succeeded, 1 otherwise")

    jobs = sub.add_parser("jobs", help="status, output and stopping of jobs started by tti submit").add_subparsers(
        dest="jobs_command", required=True)
    for name, text in (("status", "the job's status"), ("logs", "the job's output"), ("stop", "stop the job")):
        cmd = jobs.add_parser(name, help=text)
        cmd.add_argument("job_id", metavar="JOB", help="job id printed by tti submit")
        cmd.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), help=addr_help)
        if name == "logs":
            cmd.add_argument("--follow", action="store_true", help="keep printing output until the job ends")
    return parser


COMMAND_MODULES = {"train": "train", "export": "export", "data": "data",
                   "sae": {"fit": "sae_fit", "export": "sae_export"}, "eval": "eval",
                   "inspect": "inspect", "circuit": "circuit", "toy": "toy", "sweep": "sweep", "report": "report",
                   "tensorboard": "tensorboard", "submit": "submit", "jobs": "jobs"}
"""Each verb's module in tti_dist.commands ({sub-verb: module} where each sub-verb has its own)."""


def command_module(args: argparse.Namespace) -> str:
    """The tti_dist.commands module that runs the parsed command line."""
    module = COMMAND_MODULES[args.command]
    return module[getattr(args, f"{args.command}_command")] if isinstance(module, dict) else module


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tti` console script."""
    args = build_parser().parse_args(argv)
    setup_logging("INFO")
    try:
        # The verb's module is imported here, not at the top: each command loads only its
        # own dependencies, and a config error answers before megatron-core or Ray load.
        command = importlib.import_module(f"tti_dist.commands.{command_module(args)}")
        return command.main(args)
    except ConfigError as exc:
        print(f"tti: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunWriteError as exc:  # a single-process run (more ranks report through the launcher)
        print(f"tti: error: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
