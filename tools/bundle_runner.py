"""Run one bundle config: in its own Python process (``python -m monai.bundle run``, :func:`run_bundle`) or in
this one (MONAI's :class:`~monai.bundle.ConfigWorkflow`, :func:`run_bundle_in_process`).

A child process gets its overrides in a temporary ``--args_file`` (JSON), so paths and JSON values reach
the bundle verbatim, and reports its own errors as one line on stderr. The inference configs import only
the package (:mod:`lesiondiffusion.pipelines`), so all three stages can also run in one process, sparing
the start-up of each. Either way a failed run raises :class:`BundleRunError` carrying the error line.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lesiondiffusion.data_paths import BUNDLES
from lesiondiffusion.errors import LesionDiffusionError, user_error

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = BUNDLES  # the installed package data, else the source tree (lesiondiffusion.data_paths)
STAGES = ("preprocess", "vqgan", "lmnet", "linet")


class BundleRunError(LesionDiffusionError):
    """A bundle run ended with a non-zero exit status; the message is the bundle's last error line."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


def bundle_root(stage: str) -> Path:
    """The folder of a stage's bundle."""
    if stage not in STAGES:
        raise LesionDiffusionError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
    return BUNDLES_DIR / stage


def bundle_command(root: Path, configs: Sequence[str], args_file: Path) -> list[str]:
    """The ``python -m monai.bundle run`` command line for ``configs`` (names under ``configs/``)."""
    files = [str(root / "configs" / c) for c in configs]
    return [
        sys.executable, "-m", "monai.bundle", "run",
        "--bundle_root", str(root),
        "--config_file", files[0] if len(files) == 1 else json.dumps(files),
        "--meta_file", str(root / "configs" / "metadata.json"),
        "--logging_file", str(root / "configs" / "logging.conf"),
        "--args_file", str(args_file),
    ]  # fmt: skip


def bundle_env(root: Path) -> dict[str, str]:
    """The child's environment: the bundle root first on the import path, library warnings quiet."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return env


def config_keys(stage: str, configs: Sequence[str]) -> set[str]:
    """The top-level keys of ``configs`` of the ``stage`` bundle (what an override may set)."""
    root = bundle_root(stage)
    keys: set[str] = set()
    for name in configs:
        keys |= set(json.loads((root / "configs" / name).read_text(encoding="utf-8")))
    return keys


def check_overrides(stage: str, configs: Sequence[str], overrides: dict[str, Any], option: str = "") -> None:
    """Refuse override keys the configs do not have (``a#b`` is checked by ``a``): a typo never passes silently."""
    known = config_keys(stage, configs)
    unknown = sorted(k for k in overrides if k.split("#")[0] not in known)
    if unknown:
        raise LesionDiffusionError(
            f"{option}unknown setting(s) {', '.join(repr(k) for k in unknown)} for the {stage} bundle's {', '.join(configs)}"
        )


def failure_message(stage: str, stderr: str, returncode: int) -> str:
    """One line for a failed run: the bundle's own ``error:`` line, else how the process ended."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    if returncode < 0:
        return f"error: the {stage} bundle was stopped by signal {-returncode}"
    return f"error: the {stage} bundle failed (exit status {returncode}){': ' + lines[-1] if lines else ''}"


def _die_with_parent() -> None:
    """In the child: be killed when this process dies, even by SIGKILL (Linux), so no orphan writes on."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class BundleRun(subprocess.CompletedProcess):
    """A finished bundle run, with the child's wall time and its own peak resident memory."""

    def __init__(
        self, args: list[str], returncode: int, stdout: str | None, stderr: str, seconds: float, peak_rss_mib: float
    ) -> None:
        super().__init__(args, returncode, stdout, stderr)
        self.seconds = seconds
        self.peak_rss_mib = peak_rss_mib


def run_bundle(
    stage: str,
    overrides: dict[str, Any],
    configs: Sequence[str] = ("inference.json",),
    capture: bool = False,
    echo: bool | None = None,
) -> BundleRun:
    """Run ``configs`` of the ``stage`` bundle with ``overrides``; raise :class:`BundleRunError` on failure.

    With ``capture`` the child's stdout is collected; otherwise it goes to the terminal. Its stderr (logs,
    progress bars, its one-line error) is always kept, its last line becoming the error message, and is
    passed through to this process's stderr as it comes when ``echo`` (default: not ``capture``).
    """
    echo = not capture if echo is None else echo
    root = bundle_root(stage)
    missing = [c for c in configs if not (root / "configs" / c).is_file()]
    if missing:
        raise LesionDiffusionError(f"{root}: bundle config(s) not found: {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix=f"lesiondiffusion-{stage}-") as tmp:
        args_file = Path(tmp) / "overrides.json"
        args_file.write_text(json.dumps({k: v for k, v in overrides.items() if v is not None}), encoding="utf-8")
        cmd = bundle_command(root, configs, args_file)
        logger.debug("running %s", " ".join(cmd))
        # stdout goes to a file, not a pipe: only stderr is read while the child runs, so neither can block
        with open(Path(tmp) / "stdout.txt", "w+", encoding="utf-8") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(
                cmd,
                cwd=root,
                env=bundle_env(root),
                stdout=out if capture else None,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            err = bytearray()
            try:
                # raw chunks, not lines: progress bars redraw with carriage returns and must reach the terminal as such
                while chunk := proc.stderr.read1(1 << 16):  # type: ignore[union-attr]
                    err += chunk
                    if echo:
                        sys.stderr.buffer.write(chunk)
                        sys.stderr.flush()
            except BaseException:  # interrupted or terminated: the child must not go on writing into our work folder
                proc.kill()
                proc.wait()
                raise
            proc.stderr.close()  # type: ignore[union-attr]
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own resources, not all children's
            proc.returncode = os.waitstatus_to_exitcode(status)
            seconds = time.perf_counter() - start
            out.seek(0)
            stdout = out.read() if capture else None
    stderr = err.decode("utf-8", errors="replace")
    run = BundleRun(cmd, proc.returncode, stdout, stderr, seconds, usage.ru_maxrss / 1024)
    if run.returncode != 0:
        raise BundleRunError(failure_message(stage, stderr, run.returncode), run.returncode)
    return run


def run_bundle_in_process(
    stage: str, overrides: dict[str, Any], configs: Sequence[str] = ("inference.json",)
) -> BundleRun:
    """Run ``configs`` of the ``stage`` bundle in this process (``initialize``, ``run``, ``finalize``).

    The same configs, metadata and overrides as :func:`run_bundle`, so the same seed gives the same output;
    the bundle's own logging configuration is not applied (this process keeps its own). A user error
    raises :class:`BundleRunError` with its one line; any other exception is logged with its traceback
    and raised as a :class:`BundleRunError` too, as a failed child process would be.
    """
    from monai.bundle import ConfigWorkflow

    root = bundle_root(stage)
    files = [str(root / "configs" / c) for c in configs]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise LesionDiffusionError(f"{root}: bundle config(s) not found: {', '.join(missing)}")
    settings = {k: v for k, v in overrides.items() if v is not None}
    if "exit_on_error" in config_keys(stage, configs):
        settings["exit_on_error"] = False  # a user error must come back here, not end this process
    start = time.perf_counter()
    workflow_logger = logging.getLogger("monai.bundle.workflows")
    level = workflow_logger.level
    workflow_logger.setLevel(logging.ERROR)  # "logging file is set to False" is expected here
    try:
        workflow = ConfigWorkflow(
            config_file=files[0] if len(files) == 1 else files,
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type=None,
            **{**settings, "bundle_root": str(root)},
        )
        workflow_logger.setLevel(level)
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    except SystemExit as e:
        raise BundleRunError(f"error: the {stage} bundle exited (status {e.code})", int(e.code or 1)) from None
    except Exception as e:
        error = user_error(e)
        if error is None:
            logger.error("the %s bundle failed", stage, exc_info=True)
            raise BundleRunError(f"error: the {stage} bundle failed: {type(e).__name__}: {e}", 1) from None
        raise BundleRunError(f"error: {error}", 1) from None
    finally:
        workflow_logger.setLevel(level)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process's peak so far (MiB)
    return BundleRun(["monai.bundle.ConfigWorkflow", *files], 0, None, "", seconds, peak)
