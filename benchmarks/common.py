"""Pieces the bundle benchmarks share: child-process measurement, peak memory, FLOP counting, reports.

Every measurement runs in a child process of its own (``run_child``) so that its peak resident memory
is its own and a thread count can be imposed on it (``OMP_NUM_THREADS`` and ``torch.set_num_threads``):
on a machine shared with other jobs one thread per process keeps the processes from fighting over
cores. The child answers through a JSON file (``finish_child``), the parent writes the report
(``write_report``) with the machine's load before and after the run (``uptime``).
"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lesiondiffusion.data_paths import DEMO_DATA

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CPU_GFLOPS = 145.0  # this machine's fp32 matrix-product rate (2 cores), design section 8 (docs/design.md)

DEMO = DEMO_DATA  # the demo cases every benchmark builds its inputs from


# ---- memory ----------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cuda_peak_mib(device: str) -> float | None:
    """CUDA max allocated memory in MiB on a CUDA ``device``; ``None`` elsewhere."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def state_dict_mb(module) -> float:
    """Size of ``module``'s state dict as ``torch.save`` writes it, in MB."""
    import torch

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return round(buffer.getbuffer().nbytes / 1e6, 2)


# ---- timing and FLOPs ------------------------------------------------------------------------------
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (``torch.utils.flop_counter``; a multiply-add counts as two)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def best_time(fn: Callable[[], Any], repeats: int, warmup: int = 0, sync: Callable[[], Any] | None = None) -> float:
    """Shortest wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (the least disturbed by load)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return min(times)


def flop_rate(flops: int, seconds: float) -> dict[str, float]:
    """GFLOP per forward, its wall time and the rate reached, also as a fraction of ``CPU_GFLOPS``."""
    rate = flops / 1e9 / seconds
    return {
        "gflop_per_forward": round(flops / 1e9, 2),
        "forward_s": round(seconds, 3),
        "achieved_gflops": round(rate, 1),
        "fraction_of_cpu_rate": round(rate / CPU_GFLOPS, 3),
    }


# ---- bundle configs --------------------------------------------------------------------------------
def bundle_parser(
    bundle: Path, config: str, overrides: dict[str, Any] | None = None, chdir: bool = False, globals: dict | None = None
):
    """A MONAI ``ConfigParser`` of ``bundle/configs/config`` with command-line style ``overrides``.

    ``chdir`` also makes the bundle folder the working directory.
    """
    from monai.bundle import ConfigParser

    if chdir:
        os.chdir(bundle)
    parser = ConfigParser(globals=globals) if globals is not None else ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    parser["bundle_root"] = str(bundle)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


# ---- child processes -------------------------------------------------------------------------------
def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads in this process (0: torch's default)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def run_child(script: str | Path, args: list[str], threads: int = 0, work: str | Path | None = None) -> dict[str, Any]:
    """Run ``python script args --result FILE`` in a child process and return the JSON it left in FILE.

    ``threads`` > 0 sets ``OMP_NUM_THREADS`` (and ``--threads``) for it; a failed child stops the benchmark
    with the command that failed (its stderr has already gone to the console).
    """
    with tempfile.TemporaryDirectory(prefix="bench-", dir=work) as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *args, "--result", str(result)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"benchmark part failed (exit {proc.returncode}): {' '.join(cmd)}")
        return json.loads(result.read_text())


def finish_child(result: dict[str, Any], path: str | Path, device: str = "cpu") -> None:
    """Write a child's ``result`` with its peak RSS, CUDA peak and thread count to ``path``."""
    import torch

    result = {**result, "peak_rss_mib": round(peak_rss_mib(), 1), "torch_threads": torch.get_num_threads()}
    if device != "cpu":
        result["cuda_peak_mib"] = cuda_peak_mib(device)
    Path(path).write_text(json.dumps(result))


# ---- reports ---------------------------------------------------------------------------------------
def uptime() -> str:
    """The machine's ``uptime`` line (load averages over 1, 5 and 15 minutes)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine(before: dict[str, Any], threads: int) -> dict[str, Any]:
    """The report's machine entry: CPUs, Python, threads per process, load before (``before``) and now."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "threads_per_process": threads or "torch default",
        "load_before": before["load"],
        "load_after": load_avg(),
        "uptime_before": before["uptime"],
        "uptime_after": uptime(),
    }


def snapshot() -> dict[str, Any]:
    """Load average and ``uptime`` now, for ``machine`` at the end of the run."""
    return {"load": load_avg(), "uptime": uptime()}


def machine_note(m: dict[str, Any]) -> str:
    """The report's sentence about the machine and how loaded it was."""
    return (
        f"Machine: {m['cpus']} CPUs shared with other jobs while this ran (`uptime` before: `{m['uptime_before']}`; "
        f"after: `{m['uptime_after']}`), {m['threads_per_process']} torch thread(s) per measurement process. "
        "Figures on a busy shared machine are upper bounds for an idle one."
    )


def command_line(script: str | Path) -> str:
    """How this benchmark was started, relative to the repository root."""
    return "python " + " ".join([str(Path(script).resolve().relative_to(REPO)), *sys.argv[1:]])


def write_report(name: str, report: dict[str, Any], markdown: str) -> None:
    """Write ``benchmarks/results/<name>.json`` and ``.md`` atomically."""
    from lesiondiffusion.io import write_json, write_text

    write_json(RESULTS / f"{name}.json", report)
    write_text(RESULTS / f"{name}.md", markdown)


def time_iterations(trainer, sync: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run an ignite ``trainer`` and time its iterations.

    The rate is taken between the end of the first and the end of the last iteration, so that the cache
    fill and the first, slower step (lazy initialisation) are left out; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each time stamp.
    """
    from ignite.engine import Events

    stamps: list[float] = []

    def stamp(_engine) -> None:
        if sync is not None:
            sync()
        stamps.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    start = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - start
    if len(stamps) < 2:
        raise SystemExit(f"need at least 2 training iterations to time, got {len(stamps)}")
    steady = stamps[-1] - stamps[0]
    return {
        "iterations": len(stamps),
        "iterations_per_s": (len(stamps) - 1) / steady,
        "seconds_per_iteration": steady / (len(stamps) - 1),
        "first_iteration_s": stamps[0] - start,
        "run_wall_s": wall,
    }


def finish_report(
    name: str,
    script: str | Path,
    report: dict[str, Any],
    before: dict[str, Any],
    threads: int,
    markdown: Callable[[dict], str],
) -> None:
    """Add the machine entry and the command to ``report``, write it as ``<name>.{json,md}`` and print the markdown."""
    from lesiondiffusion.io import write_json

    report["machine"] = machine(before, threads)
    report["command"] = command_line(script)
    write_json(RESULTS / f"{name}.json", report)  # the measurements are kept even if the markdown fails
    text = markdown(report)
    write_report(name, report, text)
    print(text)


def rewrite_markdown(name: str, markdown: Callable[[dict], str]) -> None:
    """Render ``<name>.md`` again from the measurements in ``<name>.json`` (after a change of layout)."""
    from lesiondiffusion.io import read_json, write_text

    write_text(RESULTS / f"{name}.md", markdown(read_json(RESULTS / f"{name}.json")))
