"""proxy/ type-checks (mypy, its settings in pyproject.toml).

The seams are typing.Protocols (``protocols.base.WireProtocol``,
``services.queue.base.Queue``): nothing checks at run time that Mixpanel,
Segment, the SQLite spool and the JetStream queue still have every member
the pipeline and the sender use, with the types they use. This does: a
protocol attribute retyped, a queue method the sender calls but the
interface does not declare, a None where a str is needed, each fails here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_proxy_type_checks() -> None:
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(ROOT / ".mypy_cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_protocol_that_breaks_its_seam_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a vendor protocol whose ``max_batch_bytes``
    is a string is not a ``WireProtocol``."""
    pytest.importorskip("mypy")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from proxy.protocols.base import WireProtocol\n"
        "from proxy.protocols.mixpanel import Mixpanel\n"
        "class Broken(Mixpanel):\n"
        "    max_batch_bytes = 'many'\n"
        "seam: WireProtocol = Broken()\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(ROOT / ".mypy_cache"), str(probe)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "max_batch_bytes" in result.stdout
