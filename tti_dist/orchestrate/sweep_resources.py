"""What a sweep's trials need and what Ray offers: the embedded Ray's resources, whether
every trial fits, how many trials run at once, and whether a cluster's address answers.
"""

from __future__ import annotations

import os
import socket

import torch

from tti_dist.errors import ConfigError


def embedded_resources() -> dict[str, float]:
    """What the embedded local Ray (loopback only) offers: the machine's cores plus one logical CPU for the
    trial drivers (each reserves 0.1 CPU and only waits on Ray Train's controller, so a
    trial whose workers use every core still fits), and its GPUs."""
    resources = {"CPU": float((os.cpu_count() or 1) + 1)}
    if torch.cuda.is_available():
        resources["GPU"] = float(torch.cuda.device_count())
    return resources


def check_resources(specs: list, available: dict[str, float], where: str) -> None:
    """ConfigError naming the first trial (TrialSpec) that can never be scheduled on `available`."""
    for spec in specs:
        need = spec.required_resources()
        for resource, amount in need.items():
            have = available.get(resource, 0.0)
            if amount > have + 1e-9:
                raise ConfigError(
                    f"trial {spec.name}: its layout (parallel.tp_size x dp_size = {spec.num_workers} workers x "
                    f"{spec.cpus_per_worker:g} CPU, {spec.gpus_per_worker:g} GPU each, plus 0.1 CPU for its driver) "
                    f"needs {amount:g} {resource} but {where} has {have:g}; shrink the layout or "
                    "resources.cpus_per_worker/gpus_per_worker, or add nodes")


def concurrent_trials(specs: list, available: dict[str, float], requested: int) -> int:
    """How many trials may run at once.

    A Tune trial reserves only its driver (0.1 CPU); Ray Train asks for the workers later. So
    Tune alone would start every driver and leave their worker groups queueing for CPUs (Ray
    Train's docs say to cap max_concurrent_trials). The cap is the number of the largest
    trial's whole footprint (workers + driver) that fits the cluster, or `requested` if
    smaller: n = min over resources r of floor(available_r / need_r)."""
    fits = None
    for spec in specs:
        for resource, amount in spec.required_resources().items():
            n = int(available.get(resource, 0.0) // amount) if amount else None
            if n is not None:
                fits = n if fits is None else min(fits, n)
    fits = max(1, fits or 1)
    return min(fits, requested) if requested else fits


def check_address(address: str) -> None:
    """A `host:port` GCS address must accept a TCP connection (one-line error, in seconds)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address: {address!r} must be 'auto' or the cluster's HOST:PORT (the GCS port, 6379 by default)")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise ConfigError(f"--address: nothing answers at {address} ({exc.strerror or exc}); "
                          "is the head running (ray start --head)?") from None
