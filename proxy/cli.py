"""The ``firstparty`` command: serve, logs.

``main()`` is the only broad ``except``: known errors become one clear line
and an exit code (2 for configuration and usage, 1 for anything else).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from . import __version__
from .errors import ConfigError, ProxyError
from .files import write_private
from .lograte import EscapingFormatter, escape_control
from .services.liverelay import LiveRelay
from .settings import Settings, env_help, load_settings

# How long in-flight requests may take to finish at shutdown.
SHUTDOWN_SECONDS = 10.0
GC_YOUNG_THRESHOLD = 10_000

log = logging.getLogger("firstparty")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firstparty",
        description="First-party tracking proxy for Mixpanel with cross-domain identity.",
        epilog=f"Environment overrides (FIRSTPARTY_<SECTION>_<KEY>, values in TOML syntax): "
        f"FIRSTPARTY_CONFIG, {env_help()}",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", "-c", help="TOML settings file (default: $FIRSTPARTY_CONFIG, else built-in defaults)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--workers", type=int, help="worker processes sharing the port (server.workers)")
    serve.add_argument("--ops-port", type=int, help="the ops listener's port, 0 for none (ops.port)")

    logs = sub.add_parser("logs", help="print the forwarded log readably")
    logs.add_argument("--config", "-c", help="settings file, to find the log (log.forwarded)")
    logs.add_argument("--file", help="read this log file instead")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    logs.add_argument("--id", help="only records whose canonical or original ids include this id")
    logs.add_argument("--event", help="only records with this event name")
    logs.add_argument("--route", help="only records of this route (track, engage, ...)")
    logs.add_argument(
        "--outcome", help="only records with this outcome (forwarded, failed, dead_letter, expired, dropped)"
    )
    logs.add_argument("--json", action="store_true", help="print matching records as JSON lines")

    keygen = sub.add_parser(
        "keygen", help="add a new identity key (it signs from now on; older keys still verify until removed)"
    )
    keygen.add_argument("--config", "-c", help="settings file, to find identity.keys_file")
    keygen.add_argument("--file", help="the keys file to write (default: identity.keys_file)")
    keygen.add_argument("--id", help="key id (1-8 letters, digits, '-' or '_'; default random)")
    keygen.add_argument("--print", action="store_true", help="only print a new key line, write nothing")

    apikey = sub.add_parser(
        "apikey", help="add a server key for an app backend (POST /mp/bridge with a device id); prints the key once"
    )
    apikey.add_argument("--name", required=True, help="what logs and metrics call this key (e.g. ios-app)")
    apikey.add_argument("--config", "-c", help="settings file, to find identity.api_keys_file")
    apikey.add_argument("--file", help="the server keys file to write (default: identity.api_keys_file)")
    apikey.add_argument("--print", action="store_true", help="only print a new key line, write nothing")

    spool = sub.add_parser("spool", help="inspect the durable spool")
    spool_sub = spool.add_subparsers(dest="spool_command", required=True)
    spool_check = spool_sub.add_parser("check", help="verify every spool file offline (exit 1 if one is unreadable)")
    spool_check.add_argument("--config", "-c", help="settings file, to find the spool (delivery.spool_path)")
    stats = spool_sub.add_parser("stats", help="depth, oldest age, dead letters by reason")
    stats.add_argument("--config", "-c", help="settings file, to find the spool (delivery.spool_path)")
    stats.add_argument("--json", action="store_true", help="print as JSON")

    check = sub.add_parser("check", help="the config doctor: each problem with its fix (exit 1 on errors)")
    check.add_argument("--config", "-c", help="TOML settings file (default: $FIRSTPARTY_CONFIG, else built-in defaults)")
    check.add_argument("--online", action="store_true", help="also resolve and TLS-handshake every upstream and fetch the SDKs")
    check.add_argument("--nginx", metavar="FILE", help="also check the site's nginx config against the mounts")
    check.add_argument("--instances", type=int, default=1, help="how many instances share this config (default 1)")
    check.add_argument("--write-key", action="append", default=[], help="with --online: a Segment write key whose region to check")

    replay = sub.add_parser("replay", help="move dead letters back into the queue (after fixing their cause)")
    replay.add_argument("--config", "-c", help="settings file, to find the spool (delivery.spool_path)")
    replay.add_argument("--reason", help="only dead letters with this reason (e.g. rejected, http_401)")

    fake = sub.add_parser(
        "fake-upstream",
        help="a fake Mixpanel and Segment on one port (staging, demos): answers like them, prints each request, sends nothing on",
    )
    fake.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    fake.add_argument("--port", type=int, default=9100, help="listen port (default 9100; 0: any free port)")
    fake.add_argument("--mixpanel-js", metavar="FILE", help="mixpanel-js's snippet build to serve as the CDN's "
                      "(npm mixpanel-browser: dist/mixpanel.min.js); default: a one-line stand-in")
    fake.add_argument("--analytics-js", metavar="DIR", help="analytics.js's builds to serve as Segment's CDN's "
                      "(npm @segment/analytics-next: dist/umd); default: a one-line stand-in")
    return parser


# ------------------------------------------------------------------ serve


def _settings_for(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    if getattr(args, "host", None):
        env["FIRSTPARTY_SERVER_HOST"] = f'"{args.host}"'
    if getattr(args, "port", None) is not None:
        env["FIRSTPARTY_SERVER_PORT"] = str(args.port)
    if getattr(args, "workers", None) is not None:
        env["FIRSTPARTY_SERVER_WORKERS"] = str(args.workers)
    if getattr(args, "ops_port", None) is not None:
        env["FIRSTPARTY_OPS_PORT"] = str(args.ops_port)
    return load_settings(args.config, env)


def _run_worker(settings: Settings, reuse_port: bool, relay: LiveRelay | None = None, index: int = 0) -> None:
    if relay is not None:
        relay.become(index)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    if reuse_port:  # one of several workers: metrics in shared files, any worker answers a scrape
        from .services.metrics import enable_multiprocess

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
    from .web.app import LIVE, create_app
    from .web.serve import serve

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
            from .web.ops import create_ops_app

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
    settings = _settings_for(args)
    logging.getLogger().setLevel(settings.log.level.upper())  # log.level (FIRSTPARTY_LOG_LEVEL)
    from .services.upstream import Upstreams

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
    from .services.metrics import MULTIPROC_ENV, reset_multiprocess_dir, worker_exited

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
            gone = alive.pop(sentinel)  # type: ignore[call-overload]
            gone.join()
            if gone.pid:
                worker_exited(gone.pid)  # its spool gauges leave the totals
    return max((p.exitcode or 0) for p in procs)


# ------------------------------------------------------------------- logs


def _records(path: Path, follow: bool) -> Iterator[dict[str, Any]]:
    if not path.exists() and not follow:
        raise ProxyError(f"no forwarded log at {path}; is log.forwarded set as the proxy uses it?")
    while not path.exists():
        time.sleep(0.2)
    fh = open(path, "rb")
    inode = os.fstat(fh.fileno()).st_ino
    try:
        while True:
            line = fh.readline()
            if line.endswith(b"\n"):
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                continue
            if not follow:
                return
            time.sleep(0.2)
            fh.seek(fh.tell() - len(line))  # re-read a partial line when complete
            try:
                if os.stat(path).st_ino != inode:  # rotated: continue with the new file
                    fh.close()
                    fh = open(path, "rb")
                    inode = os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                pass
    finally:
        fh.close()


def matches(record: dict[str, Any], args: argparse.Namespace) -> bool:
    if args.route and record.get("route") != args.route:
        return False
    if getattr(args, "outcome", None) and record.get("outcome") != args.outcome:
        return False
    if args.event and args.event not in (record.get("events") or []):
        return False
    if args.id:
        ids = {*(record.get("canonical_ids") or []), *(record.get("original_ids") or [])}
        ids.update(r.get("to") for r in record.get("rewrites") or [])
        if args.id not in ids:
            return False
    return True


def format_record(record: dict[str, Any]) -> str:
    """A record as readable lines; every value from the log is escaped
    (``escape_control``): event names and ids are client text."""
    ts = datetime.fromtimestamp(record.get("time", 0), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    names = [str(n) for n in record.get("events") or []]
    shown = ", ".join(dict.fromkeys(names)) if names else "-"
    status = record.get("status")
    head = (
        f"{ts} {record.get('outcome', '?'):<11} {record.get('route', '?'):<7} {record.get('region', '?'):<2} "
        f"{status if status is not None else '-':>3} {record.get('latency_ms', 0):>8.1f}ms "
        f"{record.get('count', 0)}x {shown}"
    )
    ids = ", ".join(map(str, record.get("canonical_ids") or [])) or "-"
    sources = ", ".join(map(str, record.get("sources") or [])) or "-"
    second = f"id {ids} ({sources})"
    if record.get("project"):
        second += f"  project {record['project']}"
    if (record.get("attempts") or 1) > 1:
        second += f"  attempts {record['attempts']}"
    if record.get("host"):
        second += f"  host {record['host']}"
    lines = [head, second]
    if record.get("replaced"):
        lines.append(f"replaced {record['replaced']} ({record.get('source', '?')})")
    for r in record.get("rewrites") or []:
        lines.append(f"rewrote {r.get('field')}: {r.get('from')} -> {r.get('to')}")
    if record.get("detail"):
        lines.append(f"{record.get('reason') or 'error'}: {record['detail']}")
    elif record.get("reason"):
        lines.append(str(record["reason"]))
    return "\n    ".join(escape_control(line) for line in lines)


def cmd_logs(args: argparse.Namespace) -> int:
    if args.file:
        path = Path(args.file)
    else:
        path = load_settings(args.config).forwarded_log_path
    out = sys.stdout
    try:
        for record in _records(path, args.follow):
            if matches(record, args):
                out.write((orjson.dumps(record).decode() if args.json else format_record(record)) + "\n")
                if args.follow:
                    out.flush()
    except KeyboardInterrupt:
        pass
    return 0


# ----------------------------------------------------------------- keygen


def cmd_keygen(args: argparse.Namespace) -> int:
    from .core.tokens import KeyRing, generate_key_line

    try:
        line = generate_key_line(args.id)
    except ValueError as exc:
        raise ConfigError("--id", str(exc)) from exc
    if args.print:
        print(line)
        return 0
    if args.file:
        path = Path(args.file)
    else:
        path = Path(load_settings(args.config).identity.keys_file)
    old = path.read_text() if path.exists() else ""
    header = [ln for ln in old.splitlines() if ln.strip().startswith("#")]
    keys = [ln for ln in old.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    text = "\n".join([*header, line, *keys]) + "\n"  # the first key signs
    try:
        KeyRing.from_file(text)
    except ValueError as exc:
        raise ConfigError(str(path), str(exc)) from exc
    write_private(path, text)
    key_id = line.split()[0]
    print(f"added key {key_id} to {path}; it signs after the proxy restarts, {len(keys)} older key(s) still verify")
    return 0


def cmd_apikey(args: argparse.Namespace) -> int:
    from .core.apikeys import ApiKeys, generate_key_line

    try:
        line = generate_key_line(args.name)
    except ValueError as exc:
        raise ConfigError("--name", str(exc)) from exc
    if args.print:
        print(line)
        return 0
    target = args.file or load_settings(args.config).identity.api_keys_file
    if not target:
        raise ConfigError("identity.api_keys_file", "not set; set it (or pass --file) to say where server keys live")
    path = Path(target)
    old = path.read_text() if path.exists() else "# firstparty server keys: <name> <key>; `firstparty apikey` adds one\n"
    text = old + ("" if old.endswith("\n") else "\n") + line + "\n"
    try:
        ApiKeys.from_file(text)
    except ValueError as exc:
        raise ConfigError(str(path), str(exc)) from exc
    write_private(path, text)
    print(f"added server key {args.name!r} to {path} (read at the next start); give it to that backend only:")
    print(line.split()[1])
    return 0


# ------------------------------------------------------------------ spool


def _spool_files(args: argparse.Namespace) -> list[Path]:
    """The spool of every worker (``spool.sqlite3``, ``spool-1.sqlite3``...)."""
    base = load_settings(args.config).spool_path
    files = [p for p in (worker_spool(base, i) for i in range(64)) if p.exists()]
    if not files:
        raise ProxyError(f"no spool at {base}; is delivery.spool_path set as the proxy uses it?")
    return files


def cmd_spool_check(args: argparse.Namespace) -> int:
    """SQLite's integrity check of every spool file, read-only: the proxy need
    not be stopped. A bad file is replaced (and salvaged) at the next start."""
    import sqlite3

    bad = 0
    for path in _spool_files(args):
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
                problems = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        if problems == ["ok"]:
            print(f"ok       {path}")
            continue
        bad += 1
        print(f"corrupt  {path}: {'; '.join(problems[:5])}")
        print("         the next start moves it aside and salvages every readable row into a fresh spool")
    return 1 if bad else 0


async def _jetstream(args: argparse.Namespace, work: Any) -> Any:
    """``work(queue)`` on the configured JetStream queue (``delivery.queue = "jetstream"``)."""
    from .services.queue.jetstream import JetStreamQueue
    from .services.upstream import SEGMENT_PREFIX
    from .settings import REGIONS, SEGMENT_REGIONS

    settings = load_settings(args.config)
    queue = JetStreamQueue(settings.delivery, [*REGIONS, *(SEGMENT_PREFIX + r for r in SEGMENT_REGIONS)])
    await queue.open()
    try:
        return await work(queue)
    finally:
        await queue.close()


def _jetstream_stats(args: argparse.Namespace) -> dict[str, Any]:
    async def work(queue: Any) -> dict[str, Any]:
        stats = await queue.stats()
        stats["dead_by_reason"] = await queue.dead_by_reason()
        stats["files"] = [f"stream {queue.stream} on {queue.settings.nats_url}"]
        return stats

    import asyncio

    return asyncio.run(_jetstream(args, work))  # type: ignore[no-any-return]


def cmd_spool_stats(args: argparse.Namespace) -> int:
    from .services.queue.admin import stats_of
    from .services.queue.sqlfile import connect

    stats: dict[str, Any] = {"depth": 0, "oldest_age_seconds": 0.0, "depth_by_region": {}, "dead_letters": 0,
                             "dead_by_reason": {}, "files": []}
    if load_settings(args.config).delivery.queue == "jetstream":
        stats = _jetstream_stats(args)
    for path in _spool_files(args) if not stats["files"] else []:
        with contextlib.closing(connect(path)) as conn:
            one = stats_of(conn)
        stats["files"].append(str(path))
        stats["depth"] += one["depth"]
        stats["dead_letters"] += one["dead_letters"]
        stats["oldest_age_seconds"] = max(stats["oldest_age_seconds"], one["oldest_age_seconds"])
        for key in ("depth_by_region", "dead_by_reason"):
            for name, n in one[key].items():
                stats[key][name] = stats[key].get(name, 0) + n
    if args.json:
        print(orjson.dumps(stats).decode())
        return 0
    print(f"queued:      {stats['depth']} events")
    for region, n in sorted(stats["depth_by_region"].items()):
        print(f"  {region}: {n}")
    print(f"oldest:      {stats['oldest_age_seconds']:.1f} s")
    print(f"dead letters: {stats['dead_letters']}")
    for reason, n in sorted(stats["dead_by_reason"].items()):
        print(f"  {reason}: {n}")
    if len(stats["files"]) > 1:
        print(f"spool files: {len(stats['files'])} (one per worker)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Print every finding with its fix; 1 when any is an error, else 0. A
    config the loader refuses is one error (its own message)."""
    from . import doctor

    env = dict(os.environ)
    path = args.config or env.get("FIRSTPARTY_CONFIG")
    try:
        settings = load_settings(path, env)
    except ConfigError as exc:
        print(f"error   {exc.key}: {exc.message}")
        print("1 error, 0 warnings (the config does not load)")
        return 1
    raw: dict[str, Any] = {}
    if path:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    ctx = doctor.Context(settings, raw, env, max(1, args.instances))
    found = doctor.findings(ctx)
    if args.nginx:
        found += doctor.nginx_findings(ctx, Path(args.nginx))
    if args.online:
        found += asyncio.run(doctor.online_findings(ctx, args.write_key))
    for finding in found:
        print(finding.line())
    errors = sum(f.level == doctor.ERROR for f in found)
    warnings = len(found) - errors
    checked = "config" + (", nginx" if args.nginx else "") + (", upstreams" if args.online else "")
    print(f"{errors} error{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''} ({checked} checked)")
    return 1 if errors else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .services.queue.admin import replay
    from .services.queue.sqlfile import connect

    moved = 0
    if load_settings(args.config).delivery.queue == "jetstream":
        import asyncio

        async def work(queue: Any) -> int:
            return await queue.replay(args.reason)  # type: ignore[no-any-return]

        moved = asyncio.run(_jetstream(args, work))
    for path in _spool_files(args) if load_settings(args.config).delivery.queue != "jetstream" else []:
        with contextlib.closing(connect(path)) as conn:
            moved += replay(conn, args.reason)
    what = f" with reason {args.reason!r}" if args.reason else ""
    print(f"moved {moved} dead letter{'s' if moved != 1 else ''}{what} back into the queue")
    return 0


# ------------------------------------------------------------------- main


# ------------------------------------------------------------- fake upstream


def cmd_fake_upstream(args: argparse.Namespace) -> int:
    """Both vendors on one port until SIGTERM/SIGINT, a line per request."""
    from .fake import serve_fake

    mixpanel_js = Path(args.mixpanel_js) if args.mixpanel_js else None
    analytics_js = Path(args.analytics_js) if args.analytics_js else None
    if mixpanel_js is not None and not mixpanel_js.is_file():
        raise ConfigError("--mixpanel-js", f"{mixpanel_js} is not a file")
    if analytics_js is not None and not (analytics_js / "standalone.js").is_file():
        raise ConfigError("--analytics-js", f"{analytics_js} holds no standalone.js (npm @segment/analytics-next: dist/umd)")

    def say(line: str) -> None:
        print(escape_control(line), flush=True)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner, port = await serve_fake(args.host, args.port, mixpanel_js=mixpanel_js, analytics_js=analytics_js, printer=say)
        url = f"http://{args.host}:{port}"
        say(f"fake Mixpanel and Segment on {url}: nothing is sent on. Point every upstream at it, e.g. "
            f"FIRSTPARTY_UPSTREAM_US={url} FIRSTPARTY_UPSTREAM_DECIDE={url} FIRSTPARTY_UPSTREAM_CDN={url} "
            f"FIRSTPARTY_SEGMENT_US={url} FIRSTPARTY_SEGMENT_CDN={url}")
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(run())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    # Until a command has read its settings (serve applies log.level).
    level = os.environ.get("FIRSTPARTY_LOG_LEVEL", "info").strip('"').upper()
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler])
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "logs":
            return cmd_logs(args)
        if args.command == "keygen":
            return cmd_keygen(args)
        if args.command == "apikey":
            return cmd_apikey(args)
        if args.command == "spool":
            return cmd_spool_check(args) if args.spool_command == "check" else cmd_spool_stats(args)
        if args.command == "replay":
            return cmd_replay(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "fake-upstream":
            return cmd_fake_upstream(args)
    except ConfigError as exc:
        print(f"firstparty: {exc}", file=sys.stderr)
        return 2
    except ProxyError as exc:
        print(f"firstparty: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"firstparty: {exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": "), file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
