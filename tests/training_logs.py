"""Reading training logs: the StatsHandler lines every trainer prints (shared by the bundle and command tests)."""

from __future__ import annotations

import re

STATS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- (.*)$")


def loss_log(stdout: str) -> dict[int, dict[str, float]]:
    """{global iteration: {term: value}} from the StatsHandler lines."""
    out = {}
    for line in stdout.splitlines():
        m = STATS.search(line)
        if m:
            epoch, it, n = int(m[1]), int(m[2]), int(m[3])
            out[(epoch - 1) * n + it] = {k: float(v) for k, v in re.findall(r"(\w+): ([-\d.eE+]+)", m[4])}
    return out
