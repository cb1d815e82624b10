"""Mutation score per module from the last ``mutmut run`` (``make mutation`` prints it).

Reads ``mutmut results --all true`` (one ``<module>.<function>__mutmut_<n>: <status>`` line per mutant)
and prints, per mutated module, the mutants killed (a test failed, or it timed out), survived (every
test passed), and untested (no test covers the function), with the score killed / (killed + survived).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*(?P<module>[\w.]+?)\.x(?:_|\u01c1).*__mutmut_\d+: (?P<status>[\w ]+?)\s*$")
KILLED = {"killed", "timeout", "segfault"}


def scores(text: str) -> dict[str, Counter]:
    """Status counts per module from ``mutmut results --all true`` output."""
    out: dict[str, Counter] = defaultdict(Counter)
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            status = m["status"].strip()
            out[m["module"]]["killed" if status in KILLED else status] += 1
    return out


def main() -> int:
    mutmut = Path(sys.executable).parent / "mutmut"
    text = subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    table = scores(text)
    if not table:
        print("no mutants found: run `mutmut run` first", file=sys.stderr)
        return 1
    print(f"{'module':40} {'killed':>7} {'survived':>9} {'no tests':>9} {'score':>7}")
    total = Counter()
    for module, c in sorted(table.items()):
        total.update(c)
        tested = c["killed"] + c["survived"]
        print(f"{module:40} {c['killed']:7d} {c['survived']:9d} {c['no tests']:9d} {c['killed'] / max(tested, 1):7.1%}")
    tested = total["killed"] + total["survived"]
    print(
        f"{'all':40} {total['killed']:7d} {total['survived']:9d} {total['no tests']:9d} {total['killed'] / max(tested, 1):7.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
