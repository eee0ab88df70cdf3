"""`tti tensorboard DIR`: serve a sweep's (or a run's) TensorBoard event files.

A sweep's logdir is `OUT/runs`, every trial one run (`<trial>/tb`); what the trials record
there for the dashboards is in tti_dist/report/tensorboard.py.

**server** (`start_tensorboard`, `serve_tensorboard`). TensorBoard runs in this process
(`tensorboard.program.TensorBoard`), bound to loopback by default, with the pure-Python
event loader (`--load_fast=false`: no data-server subprocess to clean up). From a cluster
head, reach it with an SSH tunnel (`ssh -L 6006:127.0.0.1:6006 head`) rather than binding
it to a public address.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from tensorboard import program

from tti_dist.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_RELOAD_INTERVAL_S = 5.0
"""How often the server re-reads the event files (TensorBoard's own default)."""

_EVENT_FILE_MARKER = "tfevents"

# Servers started by start_tensorboard, by URL, so stop_tensorboard can shut them down.
_SERVERS: dict[str, Any] = {}
_SERVERS_LOCK = threading.Lock()


def _has_event_files(path: Path) -> bool:
    return any(p.is_file() for p in path.rglob(f"*{_EVENT_FILE_MARKER}*"))


def resolve_logdir(path: str | Path) -> Path:
    """The TensorBoard logdir for a path given on the command line.

    A sweep output directory (it has `runs/`) serves `runs/`; anything else (a run
    directory, a tb dir, any logdir) is served as is. Raises ConfigError when the path
    does not exist or holds no event files.
    """
    given = Path(path)
    if not given.is_dir():
        raise ConfigError(f"DIR: '{given}' does not exist or is not a directory")
    logdir = given / "runs" if (given / "runs").is_dir() else given
    if not _has_event_files(logdir):
        raise ConfigError(f"DIR: '{logdir}' holds no TensorBoard event files (events.out.tfevents.*)")
    return logdir


def _launch(logdir: str | Path, port: int, host: str, reload_interval: float) -> tuple[str, Any]:
    """Start TensorBoard's HTTP server in a daemon thread; (URL, server object)."""
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"--port: {port} must be in 0..65535 (0 = a free port)")
    if float(reload_interval) < 0:
        raise ValueError(f"reload_interval must be >= 0, got {reload_interval}")
    made: list[Any] = []

    def server_class(wsgi_app, flags):
        # The default server class only adds port scanning, which applies when no --port
        # is given; building the server here keeps hold of it so it can be shut down.
        server = program.WerkzeugServer(wsgi_app, flags)
        made.append(server)
        return server

    tb = program.TensorBoard(server_class=server_class)
    tb.configure(argv=[
        "",
        "--logdir", str(logdir),
        "--host", host,
        "--port", str(int(port)),  # 0: the OS picks a free port (werkzeug accepts it)
        "--reload_interval", str(float(reload_interval)),  # 0: read once at start
        "--load_fast", "false",  # in-process loader: no data-server child process
    ])
    try:
        url = tb.launch()
    except program.TensorBoardServerException as exc:
        raise ConfigError(f"--port: cannot serve on {host}:{port}: {exc.msg}") from exc
    return url, made[0]


def start_tensorboard(
    logdir: str | Path,
    port: int = 0,
    host: str = "127.0.0.1",
    *,
    reload_interval: float = DEFAULT_RELOAD_INTERVAL_S,
) -> str:
    """Serve `logdir` with TensorBoard in this process (background thread); return its URL.

    Args:
        logdir: directory searched recursively for event files (a sweep's `OUT/runs`).
        port: TCP port; 0 lets the OS pick a free one (the URL names it).
        host: address to bind; loopback by default, so only this machine (or an SSH
            tunnel) can connect.
        reload_interval: seconds between re-reads of the event files; 0 reads them once.

    The server runs until `stop_tensorboard(url)` or the end of the process. With
    reload_interval > 0 TensorBoard's reload thread keeps running after the stop (it has
    no stop signal; it is a daemon thread).
    """
    url, server = _launch(logdir, port, host, reload_interval)
    with _SERVERS_LOCK:
        _SERVERS[url] = server
    logger.info("TensorBoard serving %s at %s", logdir, url)
    return url


def stop_tensorboard(url: str) -> None:
    """Shut down a server started by `start_tensorboard` and close its socket."""
    with _SERVERS_LOCK:
        server = _SERVERS.pop(url, None)
    if server is None:
        raise KeyError(f"no TensorBoard started by start_tensorboard at {url}")
    server.shutdown()  # returns once serve_forever has stopped
    server.server_close()


def serve_tensorboard(
    logdir: str | Path,
    port: int = 0,
    host: str = "127.0.0.1",
    *,
    reload_interval: float = DEFAULT_RELOAD_INTERVAL_S,
    on_start: Callable[[str], None] | None = None,
) -> None:
    """Serve `logdir` until KeyboardInterrupt (Ctrl-C), then shut down and return.

    Prints nothing; `on_start(url)` is called once the server accepts connections (the
    CLI prints the URL there). Arguments as for `start_tensorboard`.
    """
    url, server = _launch(logdir, port, host, reload_interval)
    try:
        if on_start is not None:
            on_start(url)
        stop = threading.Event()
        # A timed wait so that Ctrl-C is handled promptly on every platform.
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
