"""``firstparty serve``: workers, signals, the orderly shutdown, GC tuning."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError
from ..services.liverelay import LiveRelay
from ..settings import Settings

from ..provision import generate_missing
from .common import log, settings_for

# How long in-flight requests may take to finish at shutdown.
SHUTDOWN_SECONDS = 10.0
GC_YOUNG_THRESHOLD = 10_000


def add_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", "-c", help="TOML settings file (default: $FIRSTPARTY_CONFIG, else built-in defaults)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--workers", type=int, help="worker processes sharing the port (server.workers)")
    serve.add_argument("--ops-port", type=int, help="the ops listener's port, 0 for none (ops.port)")


def _run_worker(settings: Settings, reuse_port: bool, relay: LiveRelay | None = None, index: int = 0) -> None:
    if relay is not None:
        relay.become(index)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    if reuse_port:  # one of several workers: metrics in shared files, any worker answers a scrape
        from ..services.metrics import enable_multiprocess

        enable_multiprocess(metrics_dir(settings))
    asyncio.run(serve_app(settings, reuse_port, relay))


def metrics_dir(settings: Settings) -> Path:
    return settings.data_dir / "metrics"


def _log_listening(settings: Settings, port: int) -> None:
    workers = settings.server.workers
    ops = settings.ops
    log.info(
        "firstparty %s listening on http://%s:%d%s (%d worker%s), upstream %s; %s",
        __version__,
        settings.server.host,
        port,
        settings.server.mounts[0],  # never empty (settings)
        workers,
        "s" if workers > 1 else "",
        settings.upstream.regions[settings.upstream.default_region],
        f"ops on http://{ops.host}:{ops.port} (/metrics, /readyz, /healthz)" if ops.port else "no ops listener (ops.port = 0)",
    )


def tune_gc() -> None:
    """Everything alive after start-up (modules, settings, services) lives as
    long as the process: freeze it out of the collector's walks. A request's
    objects die by reference counting; the default young-generation threshold
    (700 net allocations) made the collector run every ~40 requests under load
    for nothing, about 5 µs per request (timed with ``gc.callbacks`` during a
    ``bench/cpu.sh spool`` load). Cycles are still collected, just in larger
    batches."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


async def serve_app(settings: Settings, reuse_port: bool = False, relay: LiveRelay | None = None) -> None:
    """Open the services, accept until SIGTERM/SIGINT, then shut down in order:
    stop accepting, finish in-flight requests, drain the sender, close."""
    from ..web.app import LIVE, create_app
    from ..web.serve import serve

    app = create_app(settings)
    if relay is not None:  # one of several workers: the live view shows them all
        relay.start(app[LIVE])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = await serve(app, settings.server, reuse_port=reuse_port, shutdown_timeout=SHUTDOWN_SECONDS)
    ops = None
    try:
        if settings.ops.port:
            from ..web.ops import create_ops_app

            # SO_REUSEPORT always: the workers share it, and a supervisor (or a
            # test) may hold the port for it (only the same user can join).
            ops = await serve(
                create_ops_app(app), settings.server, host=settings.ops.host, port=settings.ops.port,
                reuse_port=True, shutdown_timeout=1.0,
            )
        if not reuse_port:  # one worker: say where it listens (workers: the parent said)
            _log_listening(settings, serving.port)
        tune_gc()
        await stop.wait()
    finally:
        if ops is not None:
            await ops.stop()
        if relay is not None:
            await relay.stop()
        await serving.stop()


def worker_spool(base: Path, index: int) -> Path:
    """Each worker has its own spool: one writer per SQLite file, and a sender
    that never sees another worker's rows (no double sends)."""
    return base if index == 0 else base.with_name(f"{base.stem}-{index}{base.suffix}")


def for_worker(settings: Settings, index: int) -> Settings:
    delivery = dataclasses.replace(settings.delivery, spool_path=str(worker_spool(settings.spool_path, index)))
    return dataclasses.replace(settings, delivery=delivery)


def stray_spools(base: Path, workers: int, look_ahead: int = 64) -> list[Path]:
    return [worker_spool(base, i) for i in range(workers, workers + look_ahead)]


def cmd_serve(args: argparse.Namespace) -> int:
    # The secret and keys of a first start, made once here, before any worker forks.
    settings = generate_missing(settings_for(args))
    logging.getLogger().setLevel(settings.log.level.upper())  # log.level (FIRSTPARTY_LOG_LEVEL)
    from ..services.upstream import Upstreams

    Upstreams.from_settings(settings.upstream)  # fail on bad URLs before forking
    workers = settings.server.workers
    if workers == 1:
        # Logged by the worker once bound: with --port 0 the line names the port it got.
        _run_worker(settings, reuse_port=False)
        return 0
    if settings.server.port == 0:
        raise ConfigError("server.port", "0 (any free port) works with one worker only: workers share one port")
    _log_listening(settings, settings.server.port)
    leftovers = [p for p in stray_spools(settings.spool_path, workers) if p.exists()]
    if leftovers:
        log.warning(
            "spool files of workers beyond %d remain (%s): start with --workers %d once to send them",
            workers, ", ".join(str(p) for p in leftovers), workers + len(leftovers),
        )
    from ..services.metrics import MULTIPROC_ENV, reset_multiprocess_dir, worker_exited

    reset_multiprocess_dir(metrics_dir(settings))
    os.environ[MULTIPROC_ENV] = str(metrics_dir(settings))
    ctx = multiprocessing.get_context("fork")
    relay = LiveRelay(workers)  # made before the fork: every worker inherits it
    procs = [
        ctx.Process(target=_run_worker, args=(for_worker(settings, i), True, relay, i), daemon=False)
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    relay.close()  # the workers hold their ends

    def stop(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    alive = {p.sentinel: p for p in procs}
    while alive:
        for sentinel in multiprocessing.connection.wait(list(alive)):
            gone = alive.pop(sentinel)  # type: ignore[arg-type]  # (wait() gives back the sentinels)
            gone.join()
            if gone.pid:
                worker_exited(gone.pid)  # its spool gauges leave the totals
    return max((p.exitcode or 0) for p in procs)
