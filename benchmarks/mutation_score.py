"""Mutation score per module from the last ``mutmut run`` (``make mutation`` prints it).

Reads ``mutmut results --all true`` (one ``<module>.<function>__mutmut_<n>: <status>`` line per mutant)
and prints, per mutated module, the mutants killed (a test failed, or it timed out), survived (every
test passed), and untested (no test covers the function), with the score killed / (killed + survived).

``--sample N [--seed S]`` prints instead a reproducible random sample of N mutant names per module
(from the mutants mutmut generated, ``mutants/**/*.py.meta``), to pass to ``mutmut run`` when checking
every mutant would take too long (the core modules have over 6000)::

    mutmut run $(python benchmarks/mutation_score.py --sample 40 --seed 0)

``--survivors`` lists the surviving mutants' names per module, for review with ``mutmut show NAME``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*(?P<name>(?P<module>[\w.]+?)\.x(?:_|\u01c1).*__mutmut_\d+): (?P<status>[\w ]+?)\s*$")
KILLED = {"killed", "timeout", "segfault"}
MUTANTS = Path("mutants")


def results_text() -> str:
    """``mutmut results --all true`` of the last run."""
    mutmut = Path(sys.executable).parent / "mutmut"
    return subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True).stdout


def scores(text: str) -> dict[str, Counter]:
    """Status counts per module from ``mutmut results --all true`` output."""
    out: dict[str, Counter] = defaultdict(Counter)
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            status = m["status"].strip()
            out[m["module"]]["killed" if status in KILLED else status] += 1
    return out


def survivors(text: str) -> dict[str, list[str]]:
    """Names of the surviving mutants per module."""
    out: dict[str, list[str]] = defaultdict(list)
    for line in text.splitlines():
        m = LINE.match(line)
        if m and m["status"].strip() == "survived":
            out[m["module"]].append(m["name"])
    return out


def mutant_names(root: Path = MUTANTS) -> dict[str, list[str]]:
    """Every generated mutant's name per module, from mutmut's ``.meta`` files, in a stable order."""
    out: dict[str, list[str]] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        names = sorted(json.loads(meta.read_text())["exit_code_by_key"])
        if names:
            out[names[0].split(".x", 1)[0]] = names
    return out


def sample(names: dict[str, list[str]], n: int, seed: int) -> list[str]:
    """``n`` mutants per module drawn without replacement (all of a module that has fewer)."""
    rng = random.Random(seed)
    return [name for module in sorted(names) for name in sorted(rng.sample(names[module], min(n, len(names[module]))))]


def print_scores(table: dict[str, Counter]) -> None:
    """The per-module table: killed, survived, no tests, score."""
    print(f"{'module':40} {'killed':>7} {'survived':>9} {'no tests':>9} {'score':>7}")
    total: Counter = Counter()
    for module, c in sorted(table.items()):
        total.update(c)
        row(module, c)
    row("all", total)


def row(module: str, c: Counter) -> None:
    """One line of the table."""
    score = c["killed"] / max(c["killed"] + c["survived"], 1)
    print(f"{module:40} {c['killed']:7d} {c['survived']:9d} {c['no tests']:9d} {score:7.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, help="print N mutant names per module instead of the scores")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants per module")
    args = parser.parse_args(argv)
    if args.sample is not None:
        names = mutant_names()
        if not names:
            print("no mutants generated: run `mutmut run` once first (it generates them)", file=sys.stderr)
            return 1
        print("\n".join(sample(names, args.sample, args.seed)))
        return 0
    text = results_text()
    if args.survivors:
        for module, found in sorted(survivors(text).items()):
            print(f"{module}: {len(found)}")
            print("\n".join(f"  {name}" for name in found))
        return 0
    table = scores(text)
    if not any(c["killed"] + c["survived"] for c in table.values()):
        print("no mutants checked: run `mutmut run` first", file=sys.stderr)
        return 1
    print_scores(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
