"""Per-module mutation scores of the last ``mutmut run`` (read from ``mutants/``).

    python scripts/mutation_report.py [--survivors MODULE]

Score = killed / (killed + survived + timeouts counted as killed): mutants no
selected test reaches ("no tests") are listed apart, not counted as killed.
``--survivors proxy.core.cors`` prints each survivor's diff (``mutmut show``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLED = {1, 3, 36, 24, -24, 152, 37, -11}  # tests failed, pytest errored, timed out, caught by type check, crashed (SIGSEGV)
SURVIVED = {0}
NO_TESTS = {5, 33}


def results() -> dict[str, dict[str, int | None]]:
    by_module: dict[str, dict[str, int | None]] = defaultdict(dict)
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        module = ".".join(meta.relative_to(ROOT / "mutants").with_suffix("").with_suffix("").parts)
        for key, code in data.get("exit_code_by_key", {}).items():
            by_module[module][key] = code
    return by_module


def main(argv: list[str]) -> int:
    if not (ROOT / "mutants").exists():
        print("no mutants/ here: run scripts/mutation first")
        return 1
    data = results()
    if argv[:1] == ["--survivors"]:
        module = argv[1]
        for key, code in sorted(data.get(module, {}).items()):
            if code in SURVIVED:
                shown = subprocess.run(["mutmut", "show", key], cwd=ROOT, capture_output=True, text=True).stdout
                print(f"# {key}\n" + "\n".join(l for l in shown.splitlines() if l[:2] in ("- ", "+ ")))
        return 0
    print("| module | mutants | killed | survived | no test reaches it | not run | score |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    total: Counter[str] = Counter()
    for module, codes in sorted(data.items()):
        if not codes:
            continue
        c = Counter(
            "killed" if v in KILLED else "survived" if v in SURVIVED else "no_tests" if v in NO_TESTS
            else "not_run" if v is None else "other"
            for v in codes.values()
        )
        total.update(c)
        judged = c["killed"] + c["survived"]
        score = f"{100 * c['killed'] / judged:.1f} %" if judged else "-"
        print(f"| {module} | {len(codes)} | {c['killed']} | {c['survived']} | {c['no_tests']} | {c['not_run']} | {score} |")
    judged = total["killed"] + total["survived"]
    score = f"{100 * total['killed'] / judged:.1f} %" if judged else "-"
    print(f"| **all** | {sum(total.values())} | {total['killed']} | {total['survived']} | {total['no_tests']} | "
          f"{total['not_run']} | **{score}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
