"""Named mutations: breakages a reviewer made on purpose, each of which the
suite must catch. Every entry changes one spot of the code (an exact text,
which must occur once, so the list fails loudly when the code moves) in a
scratch copy of the project, runs the tests that should notice, and expects
them to fail. Complements mutmut's generated mutants (``scripts/mutation``)
with the cases that matter most for not losing or mis-attributing data.

    python scripts/named_mutations.py [NAME ...]     # all when none given

Exit code 0 when every mutation is killed, 1 when one survives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "no-insert-id",
        "events without $insert_id are spooled without one: a resend after a crash is counted twice",
        "proxy/protocols/mixpanel.py",
        'insert_id = props["$insert_id"] = secrets.token_hex(16)',
        "insert_id = None",
        ("tests/test_delivery.py", "tests/test_codec.py"),
    ),
    Mutation(
        "sender-ignores-timeout",
        "the sender waits 60 s for a hung vendor instead of upstream.timeout_seconds",
        "proxy/services/delivery.py",
        "                timeout=self.timeout,\n",
        "                timeout=60.0,\n",
        ("tests/test_delivery.py",),
    ),
    Mutation(
        "no-ip-on-profiles",
        "spooled profile updates lose the visitor's $ip (profile geolocation)",
        "proxy/protocols/mixpanel.py",
        '        if ip and "$ip" not in event:\n            event["$ip"] = ip\n',
        "",
        ("tests/test_delivery.py", "tests/test_proxy.py"),
    ),
    Mutation(
        "readyz-always-200",
        "/readyz answers 200 with the spool full or the store down",
        "proxy/web/probes.py",
        "return json_response(body, status=200 if ok else 503)",
        "return json_response(body, status=200)",
        ("tests/test_delivery.py", "tests/test_proxy.py", "tests/test_store.py"),
    ),
    Mutation(
        "decide-not-rewritten",
        "decide's distinct_id is forwarded as the SDK sent it, not the canonical id",
        "proxy/protocols/mixpanel.py",
        "return rewrite_query(query, QUERY_ID_FIELDS[route], mapping, out)",
        "return query",
        ("tests/test_proxy.py", "tests/test_crossdomain.py"),
    ),
]


def scratch_copy() -> Path:
    """The tracked files of the project (what CI would check out), in a temp dir."""
    dest = Path(tempfile.mkdtemp(prefix="named-mutations-"))
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def apply(copy: Path, m: Mutation) -> str:
    target = copy / m.path
    text = target.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"{m.name}: the text to mutate occurs {count} times in {m.path}; update this list")
    target.write_text(text.replace(m.old, m.new))
    return text


def run(copy: Path, m: Mutation) -> tuple[bool, float, str]:
    original = apply(copy, m)
    env = {**os.environ, "PYTHONPATH": str(copy)}  # the copy's proxy/, also in servers the tests start
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *m.tests],
            cwd=copy, env=env, capture_output=True, text=True, timeout=900,
        )
    finally:
        (copy / m.path).write_text(original)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED") or line.startswith("ERROR")]
    return proc.returncode != 0, time.monotonic() - started, (failed[0] if failed else proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or m.name in argv]
    unknown = set(argv) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutation(s): {', '.join(sorted(unknown))}; known: {', '.join(m.name for m in MUTATIONS)}")
        return 2
    copy = scratch_copy()
    survivors = 0
    try:
        for m in chosen:
            killed, seconds, detail = run(copy, m)
            survivors += not killed
            print(f"{'killed ' if killed else 'SURVIVED'} {m.name:24} {seconds:6.1f} s  {detail}")
            if not killed:
                print(f"         {m.why}")
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    print(f"{len(chosen) - survivors} of {len(chosen)} named mutations killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
