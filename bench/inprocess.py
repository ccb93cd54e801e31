"""The proxy's own cost per request, without the network: the real app
(``create_app``, its spool, sender and upstream client) with its event
handler called directly on aiohttp request objects, 64 at a time, as
``wrk -c64`` would send them; the sender forwards to a fast nginx upstream
the script starts (and stops) on 127.0.0.1.

    python bench/inprocess.py [--events 10] [--requests 3200] [--mode spool|sync]
    python bench/inprocess.py --instructions [--events 10]   # under callgrind
    python bench/inprocess.py --instructions --ablate no-delivery-log   # a part taken away (bench/ablate.py)
    python bench/inprocess.py --instructions --mode floor   # the durable floor (bench/floor_spool.py), alike
    python bench/inprocess.py --instructions --by-library   # and where they go: python, libsqlite3, orjson...

It prints CPU µs per request (the whole process, and per thread: the event
loop, the spool's SQLite thread) once the spool has drained, so the sender's
and SQLite's shares are in. ``--instructions`` runs it twice under valgrind's
callgrind (N and 2N requests) and prints the difference per request: user-space
instructions, repeatable on these shared machines where CPU time is not
(start-up, imports and the CA store drop out of the difference). It is the
figure to compare two versions of the pipeline with; aiohttp's HTTP parsing and
writing (row E of ``bench/run.py``) are not in it. Every request is the bench's
mixpanel-js POST (``--events`` copies of its ``Page View`` event, one visitor,
each with its own ``$insert_id``), no cookie: a first visit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
# The proxy measured: this checkout's, or another tree's (``BENCH_PROXY_TREE``:
# bench/ab_instructions.sh measures two commits with this one script).
sys.path.insert(0, os.environ.get("BENCH_PROXY_TREE", str(ROOT)))
sys.path.insert(0, str(ROOT / "bench"))

ABLATIONS = ("no-sqlite", "no-sender", "no-delivery-log", "no-upstream-call", "no-spool", "read-only")  # bench/ablate.py's

CONCURRENCY = 64
WARM_UP = 320
PATH = "/mp/track/?verbose=1&ip=1&_=1795374436452"


def body(events: int) -> bytes:
    import stages  # the bench's event, as bench/stages.py builds it

    one = json.loads(base64.b64decode(stages.body(1)[5:].decode().replace("%2B", "+").replace("%2F", "/").replace("%3D", "=")))
    batch = [dict(one, properties=dict(one["properties"], **{"$insert_id": f"abcdefgh{i:08d}"})) for i in range(events)]
    raw = json.dumps(batch[0] if events == 1 else batch).encode()
    return ("data=" + quote(base64.b64encode(raw).decode(), safe="")).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_upstream(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    (tmp / "up.conf").write_text(
        f"worker_processes 1; pid {tmp}/up.pid; error_log {tmp}/up.err warn; daemon off;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; client_body_temp_path {tmp}/b; keepalive_requests 100000000;\n"
        f"  server {{ listen 127.0.0.1:{port}; location / {{ default_type application/json;"
        " return 200 '{\"status\":1,\"error\":null}'; } } }\n"
    )
    proc = subprocess.Popen([nginx, "-p", str(tmp), "-c", str(tmp / "up.conf")], stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("nginx (the fake upstream) did not start")


def thread_ticks() -> dict[str, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        out[tid] = int(fields[11]) + int(fields[12])
    return out


async def run(
    events: int, requests: int, mode: str, upstream_port: int, data_dir: Path, ablation: str | None = None, extra: str = ""
) -> None:
    from aiohttp import HttpVersion11, web
    from aiohttp.base_protocol import BaseProtocol
    from aiohttp.http_parser import RawRequestMessage
    from aiohttp.streams import StreamReader
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    from proxy.settings import load_settings
    from proxy.web.app import SPOOL, create_app

    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "proxy.toml"
    config.write_text(
        f'[server]\ndata_dir = "{data_dir}"\n[upstream]\nus = "http://127.0.0.1:{upstream_port}"\n'
        f'[cookie]\nsecure = false\nsecret = "inprocess-bench-secret-inprocess"\n[delivery]\nmode = "{mode}"\n'
        + extra.replace("\\n", "\n")
    )
    floor = None
    if mode == "floor":  # bench/floor_spool.py's durable floor (row I of bench/run.py), one row per request
        import floor_spool

        floor = floor_spool.FloorSpool(data_dir, f"http://127.0.0.1:{upstream_port}", per_request=True)
        await floor.start()
        app = web.Application()
        app.router.add_post("/mp/track/", floor.handle)
    else:
        try:
            from proxy.provision import generate_missing  # a first start's secret and keys
        except ImportError:  # a tree from before provision: settings made them
            def generate_missing(settings):  # type: ignore[no-untyped-def]
                return settings

        app = create_app(generate_missing(load_settings(config)))
    runner = web.AppRunner(app)
    await runner.setup()  # runs the clean-up contexts' start: spool, sender, client
    loop = asyncio.get_running_loop()
    from stages import HEADERS  # the bench's browser headers

    payload = body(events)
    headers = {**HEADERS, "Content-Length": str(len(payload))}
    message = RawRequestMessage(
        "POST", PATH, HttpVersion11, CIMultiDictProxy(CIMultiDict(headers)),
        tuple((k.encode(), v.encode()) for k, v in headers.items()), False, None, False, False, URL(PATH),
    )

    class Transport:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    class Protocol:  # what aiohttp's Request reads of its connection
        transport = Transport()
        peername = ("127.0.0.1", 50000)
        sockname = ("127.0.0.1", 8000)
        ssl_context = None
        writer = None

    protocol, reader_protocol = Protocol(), BaseProtocol(loop)

    async def one() -> None:
        content = StreamReader(reader_protocol, 2**16, loop=loop)
        content.feed_data(payload)
        content.feed_eof()
        request = web.Request(message, content, protocol, None, None, loop, client_max_size=10**7)  # type: ignore[arg-type]
        # As aiohttp's server hands it over: routed, through the app's middlewares.
        response = await app._handle(request)
        if response.status != 200:
            raise SystemExit(f"the proxy answered {response.status}: {response.body!r}")

    async def load(n: int) -> None:
        async def worker() -> None:
            for _ in range(n // CONCURRENCY):
                await one()

        await asyncio.gather(*[worker() for _ in range(CONCURRENCY)])

    async def drained() -> None:
        if floor is not None:
            deadline = loop.time() + 60
            while (floor.inserts or floor.deletes or floor.ready or floor.sends) and loop.time() < deadline:
                await asyncio.sleep(0.01)
            return
        if mode != "spool":
            return
        spool = app[SPOOL]
        deadline = loop.time() + 60
        unsent = ablation in ("no-sender", "no-spool")  # nothing will take the rows away: wait for the writes only
        while ((spool.depth and not unsent) or spool._inserts or spool._deletes) and loop.time() < deadline:
            await asyncio.sleep(0.01)

    await load(WARM_UP)
    await drained()
    done = requests // CONCURRENCY * CONCURRENCY
    ticks0, cpu0 = thread_ticks(), time.process_time()
    await load(done)
    await drained()
    cpu1, ticks1 = time.process_time(), thread_ticks()
    per_tick = 1e6 / os.sysconf("SC_CLK_TCK") / done
    threads = sorted(((ticks1[t] - ticks0.get(t, 0)) * per_tick for t in ticks1), reverse=True)
    split = ", ".join(f"{t:.1f}" for t in threads if t > 0.05)
    label = f"{mode} {ablation}" if ablation else mode
    print(f"{label}, {events} event(s) per request, {done} requests: {(cpu1 - cpu0) * 1e6 / done:.1f} CPU µs per request "
          f"(by thread: {split})")
    await runner.cleanup()
    if floor is not None:
        await floor.session.close()
        floor.thread.shutdown()


def instructions(args: argparse.Namespace) -> None:
    """Run this script under callgrind for N and 2N requests; print the difference per request."""
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    totals = []
    libraries: list[dict[str, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.requests, 2 * args.requests):
            out = Path(tmp) / f"cg.{n}"
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                   "--events", str(args.events), "--requests", str(n), "--mode", args.mode,
                   *(["--ablate", args.ablate] if args.ablate else []), *(["--toml", args.toml] if args.toml else [])]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            text = subprocess.run(["callgrind_annotate", str(out)], capture_output=True, text=True, check=True).stdout
            match = re.search(r"([\d,]+) \([^)]*\)\s+PROGRAM TOTALS", text)
            if not match:
                raise SystemExit("callgrind_annotate printed no total")
            totals.append(int(match.group(1).replace(",", "")))
            if args.by_library:
                text = subprocess.run(["callgrind_annotate", "--threshold=100", str(out)], capture_output=True,
                                      text=True, check=True).stdout
                libraries.append(by_library(text))
    requests = args.requests // CONCURRENCY * CONCURRENCY
    per = (totals[1] - totals[0]) / requests
    label = f"{args.mode} {args.ablate}" if args.ablate else args.mode
    print(f"{label}, {args.events} event(s) per request: {per:,.0f} instructions per request (user space, callgrind)")
    if libraries:
        first, second = libraries
        rows = sorted(((second.get(k, 0) - first.get(k, 0)) / requests, k) for k in set(first) | set(second))
        for count, name in reversed(rows):
            if count >= 1000:
                print(f"  {count:>10,.0f}  {name}")


def by_library(annotated: str) -> dict[str, int]:
    """callgrind_annotate's per-function lines summed by the object file they
    are in (the interpreter, SQLite, orjson, libc, OpenSSL...)."""
    sums: dict[str, int] = {}
    for match in re.finditer(r"^\s*([\d,]+) \([^)]*\)\s+\S.*\[(.+?)\]\s*$", annotated, re.M):
        name = Path(match.group(2)).name
        sums[name] = sums.get(name, 0) + int(match.group(1).replace(",", ""))
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1)
    parser.add_argument("--requests", type=int, default=None, help="default 3200 (640 with --instructions)")
    parser.add_argument("--mode", choices=["spool", "sync", "floor"], default="spool",
                        help="floor: bench/floor_spool.py's durable floor instead of the proxy")
    parser.add_argument("--instructions", action="store_true")
    parser.add_argument("--by-library", action="store_true",
                        help="with --instructions: also per object file (python, libsqlite3, orjson, libc...)")
    parser.add_argument("--toml", default="", help='settings sections added to the bench\'s own, "\\n" for newlines '
                        '(e.g. \'[privacy]\\nbots = "keep"\\nscrub_query_params = []\')')
    parser.add_argument("--ablate", choices=sorted(ABLATIONS), help="take one part away (bench/ablate.py)")
    args = parser.parse_args()
    if args.requests is None:
        args.requests = 640 if args.instructions else 3200
    if args.instructions:
        instructions(args)
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from proxy.cli import tune_gc

    if args.ablate:
        import ablate  # beside this script; imports the proxy, so only when asked for

        ablate.ABLATIONS[args.ablate]()
    tune_gc()
    with tempfile.TemporaryDirectory() as tmp:
        upstream, port = start_upstream(Path(tmp))
        try:
            asyncio.run(run(args.events, args.requests, args.mode, port, Path(tmp) / "data", args.ablate, args.toml))
        finally:
            upstream.terminate()
            upstream.wait(timeout=10)


if __name__ == "__main__":
    main()
