"""The soak, short (issue 10): bench/soak.py's whole schedule of faults in 45 s,
as CI runs it. The vendor down, Redis killed and started again, the spool's disk
nearly full (when a tmpfs can be mounted), SIGTERM and restart: every
acknowledged event must reach the vendor. The 5- and 10-minute runs, with their
RSS and open-file plots, are in BENCHMARKS.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_soak_loses_no_acknowledged_event(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.75", "--clients", "12",
         "--plot", str(tmp_path / "soak.svg")],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    report = run.stdout + run.stderr
    row = re.search(r"^\| ([\d,]+) \| ([\d,]+) \| (\d+) \| (\d+) \|", run.stdout, re.M)
    assert row, report[-3000:]
    acked, delivered, lost = (int(g.replace(",", "")) for g in row.groups()[:3])
    assert acked > 1000 and lost == 0 and delivered == acked, report[-3000:]
    assert run.returncode == 0, report[-3000:]
    # Every phase of the schedule ran (the restart's 2 s may pass with no answer at all: "-").
    for phase in ("normal", "vendor down", "redis killed", "redis back", "restart"):
        assert re.search(rf"^\| {phase} \| (?:[\d.]+ ms|-) \| [\d,]+ \|$", run.stdout, re.M), (phase, report[-3000:])
    assert (tmp_path / "soak.svg").read_text().startswith("<svg")
