"""`tti jobs status|logs|stop JOB --address http://HEAD:8265 [--follow]`: jobs started by tti submit."""

from __future__ import annotations

import argparse
import sys

from tti_dist.errors import EXIT_RUN_FAILED
from tti_dist.orchestrate import jobs


def follow_job(job_id: str, address: str) -> int:
    """Print the job's output until it ends; 0 when it succeeded, 1 otherwise, 130 on Ctrl-C
    (the job keeps running)."""
    cluster = jobs.connect(address)
    try:
        for chunk in jobs.logs(job_id, None, follow=True, cluster=cluster):
            print(chunk, end="", flush=True)
    except KeyboardInterrupt:
        print(f"\ntti: stopped following; the job keeps running (tti jobs stop {job_id} --address {address})",
              file=sys.stderr)
        return 130
    final = jobs.wait_for(job_id, None, cluster=cluster)
    print(f"{job_id}: {final}", file=sys.stderr)
    return 0 if final == "SUCCEEDED" else EXIT_RUN_FAILED


def main(args: argparse.Namespace) -> int:
    if args.jobs_command == "status":
        details = jobs.info(args.job_id, args.address)
        message = f" ({details.message})" if details.message else ""
        print(f"{args.job_id}: {details.status}{message}")
    elif args.jobs_command == "logs":
        if args.follow:
            return follow_job(args.job_id, jobs.normalize_address(args.address))
        print(jobs.logs(args.job_id, args.address), end="")
    else:
        cluster = jobs.connect(args.address)
        if jobs.stop(args.job_id, None, cluster=cluster):
            print(f"{args.job_id}: stop requested")
        else:
            print(f"{args.job_id}: not running ({jobs.status(args.job_id, None, cluster=cluster)})")
    return 0
