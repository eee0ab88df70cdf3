"""`tti tensorboard DIR [--port P] [--host 127.0.0.1]`: serve TensorBoard on a sweep, a run
or any logdir."""

from __future__ import annotations

import argparse

from tti_dist.report.tensorboard_server import resolve_logdir, serve_tensorboard


def main(args: argparse.Namespace) -> int:
    logdir = resolve_logdir(args.dir)

    def announce(url: str) -> None:
        print(f"TensorBoard serving {logdir} at {url} (Ctrl-C to stop)", flush=True)

    serve_tensorboard(logdir, port=args.port, host=args.host, on_start=announce)
    return 0
