"""`tti submit CONFIG_OR_SWEEP --address http://HEAD:8265 [...] [--wait]`: a sweep or run
config as a Ray Job on a cluster."""

from __future__ import annotations

import argparse
import sys

from tti_dist.commands.jobs import follow_job
from tti_dist.orchestrate import jobs


def main(args: argparse.Namespace) -> int:
    job_id = jobs.submit(args.config, args.address, out=args.out, overrides=args.overrides,
                         working_dir=args.working_dir, runtime_env=args.runtime_env)
    print(job_id, flush=True)
    address = jobs.normalize_address(args.address)
    if not args.wait:
        print(f"follow it with: tti jobs logs {job_id} --address {address} --follow", file=sys.stderr)
        return 0
    return follow_job(job_id, address)
