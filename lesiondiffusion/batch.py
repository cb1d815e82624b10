"""Batch synthesis across processes and machines: ``torchrun ... -m lesiondiffusion synthesize --requests F``.

Each process (rank) takes every ``world_size``-th request of the requests file, in file order, and runs
the synthesis chain on each of its cases alone (the same call whatever the number of processes, so one
process and N give the same files). A finished case folder is moved into ``<out>/<case>/`` by one rename
(never half there) and recorded with the SHA-256 of each file in the rank's record
(``<out>/.batch/rank<r>.json``, rewritten atomically after every case). A case that fails is recorded
with its error; the rank goes on. When every rank is done, rank 0 merges the records into one
``<out>/summary.json`` (cases in request order, with their hashes).

``--resume`` reruns into an existing ``<out>``: a case whose folder holds exactly the files and hashes
recorded (in ``summary.json`` or a rank record a killed run left) is skipped; any other folder of a
requested case (a run killed mid-case, a changed file) is removed and the case is redone.

The processes talk through ``torch.distributed`` (gloo on CPU, NCCL on GPUs) only to wait for each
other; each rank uses ``cuda:<LOCAL_RANK>`` when GPUs are present.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import file_sha256, read_json, user_path, write_json
from lesiondiffusion.requests import read_requests

logger = logging.getLogger(__name__)

BATCH_DIR = ".batch"
SUMMARY = "summary.json"
_in_case = False  # set while a rank runs one case, so that call is an ordinary synthesis


@dataclass(frozen=True)
class Ranks:
    """This process's place among the batch's processes (torchrun's environment; one process without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    def shard(self, items: list[Any]) -> list[Any]:
        """The items this rank does: every ``world_size``-th, starting at ``rank``."""
        return items[self.rank :: self.world_size]


def wanted(resume: bool) -> bool:
    """Whether a ``--requests`` run goes through the batch engine: under torchrun, or to resume."""
    return not _in_case and (resume or "WORLD_SIZE" in os.environ)


def device_for(ranks: Ranks) -> str | None:
    """``cuda:<local rank>`` when GPUs are present, else None (the stages' own default, the CPU)."""
    import torch  # here, not at the top: the command line starts without torch

    return f"cuda:{ranks.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else None


@contextmanager
def process_group(ranks: Ranks) -> Iterator[None]:
    """The batch's process group (gloo on CPU, NCCL on GPUs) for the block; nothing for one process."""
    import torch
    import torch.distributed as dist

    if ranks.world_size == 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def case_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in a case folder, by path relative to it."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def is_complete(folder: Path, record: dict[str, Any] | None) -> bool:
    """Whether ``folder`` holds exactly the files ``record`` lists, with their hashes."""
    if not record or record.get("status") != "ok" or not record.get("files") or not folder.is_dir():
        return False
    return case_files(folder) == record["files"]


def known_records(out: Path) -> dict[str, dict[str, Any]]:
    """Case records a previous run left: the merged summary, then rank records (a killed run's), newest last."""
    records: dict[str, dict[str, Any]] = {}
    summary = out / SUMMARY
    sources = ([summary] if summary.is_file() else []) + sorted((out / BATCH_DIR).glob("rank*.json"))
    for source in sources:
        try:
            for item in read_json(source).get("cases", []):
                if isinstance(item, dict) and isinstance(item.get("case"), str):
                    records[item["case"]] = item
        except (LesionDiffusionError, AttributeError):
            logger.warning("%s: unreadable batch record, ignored (its cases are redone)", source)
    return records


def single_request(requests_file: Path, index: int, dest: Path) -> Path:
    """The ``index``-th entry of a requests file as a requests file of its own (paths made absolute)."""
    obj = read_json(requests_file)
    entry = dict(obj["requests"][index])
    for key in ("image", "organ_seg"):
        if isinstance(entry.get(key), str):
            p = user_path(entry[key])
            entry[key] = str(p if p.is_absolute() else (requests_file.parent / p).absolute())
    head = {k: v for k, v in obj.items() if k != "requests"}
    return write_json(dest, {**head, "requests": [entry]})


def _progress(out: Path, total: int) -> str:
    """Cases recorded by all ranks so far (read from their records)."""
    done = 0
    for source in (out / BATCH_DIR).glob("rank*.json"):
        try:
            done += len(read_json(source).get("cases", []))
        except LesionDiffusionError:
            pass
    return f"all ranks {done}/{total}"


def run_batch(
    requests_file: Path,
    out: Path,
    run_case: Callable[[Path, Path, str | None], Any],
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Synthesise this rank's share of ``requests_file`` into ``out``; rank 0 writes the merged summary.

    ``run_case(requests, out_dir, device)`` synthesises a one-case requests file into a fresh ``out_dir``
    (``out_dir/<case>/``) and raises :class:`LesionDiffusionError` when the case fails. Returns the
    merged summary (rank 0) or this rank's record (other ranks); raises when any of its cases failed.
    """
    ranks = Ranks.from_env()
    requests_file = user_path(requests_file).absolute()
    out = user_path(out).absolute()
    requests = read_requests(requests_file)  # every rank checks the whole file before any work
    if out.exists() and not (resume or overwrite):
        raise LesionDiffusionError(
            f"{out}: output folder exists; pass --resume to complete it or --overwrite to replace it"
        )
    if out.exists() and not out.is_dir():
        raise InputError(out, "not a folder")
    with process_group(ranks):
        barrier()  # every rank has looked at <out> before rank 0 changes it
        if ranks.rank == 0:
            if overwrite and not resume and out.exists():
                shutil.rmtree(out)
            (out / BATCH_DIR).mkdir(parents=True, exist_ok=True)
        barrier()
        previous = known_records(out) if resume else {}
        record_path = out / BATCH_DIR / f"rank{ranks.rank}.json"
        mine: dict[str, dict[str, Any]] = {}  # this rank's cases; a killed run's record is among `previous`
        work = out / BATCH_DIR / f"work{ranks.rank}"
        shutil.rmtree(work, ignore_errors=True)
        shard = ranks.shard(list(enumerate(requests)))
        device = device_for(ranks)
        bar = tqdm(shard, desc=f"rank {ranks.rank}/{ranks.world_size}", unit="case", position=ranks.rank)
        for index, request in bar:
            folder = out / request.case
            if resume and is_complete(folder, previous.get(request.case)):
                mine[request.case] = {**previous[request.case], "skipped": True}
                logger.info("%s: complete and verified, skipped", request.case)
            else:
                shutil.rmtree(folder, ignore_errors=True)  # a partial or changed case is redone
                mine[request.case] = _one_case(
                    requests_file, index, request.case, work, folder, run_case, device, ranks
                )
            write_json(record_path, {"rank": ranks.rank, "world_size": ranks.world_size, "cases": list(mine.values())})
            bar.set_postfix_str(_progress(out, len(requests)))
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
        barrier()  # every rank's record is written
        if ranks.rank == 0:
            summary = _merge(out, requests, ranks)
        barrier()  # the merged summary is written before any rank returns
    failed = [c for c in mine.values() if c["status"] != "ok"]
    if ranks.rank == 0:
        print(
            f"{summary['succeeded']} of {len(requests)} case(s) complete ({summary['skipped']} verified and skipped); summary: {out / SUMMARY}"
        )
        if summary["failed"]:
            raise LesionDiffusionError(f"{summary['failed']} of {len(requests)} case(s) failed (see {out / SUMMARY})")
        return summary
    if failed:
        raise LesionDiffusionError(f"rank {ranks.rank}: {len(failed)} case(s) failed (see {out / SUMMARY})")
    return {"cases": list(mine.values())}


def _one_case(
    requests_file: Path, index: int, case: str, work: Path, folder: Path,
    run_case: Callable[[Path, Path, str | None], Any], device: str | None, ranks: Ranks,
) -> dict[str, Any]:  # fmt: skip
    """Run one case into ``work``, move its folder into place with one rename, return its record."""
    global _in_case
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    _in_case = True
    try:
        run_case(single_request(requests_file, index, work / "request.json"), work / "out", device)
        os.replace(work / "out" / case, folder)  # the case appears whole or not at all
        files = case_files(folder)
        return {
            "case": case,
            "status": "ok",
            "rank": ranks.rank,
            "seconds": round(time.perf_counter() - start, 3),
            "files": files,
        }
    except Exception as e:  # noqa: BLE001 -- one failed case never stops the rank's other cases
        message = " ".join(str(e).split()) or type(e).__name__
        logger.error("%s: failed: %s", case, message)
        return {"case": case, "status": "error", "rank": ranks.rank, "error": message}
    finally:
        _in_case = False
        shutil.rmtree(work, ignore_errors=True)


def _merge(out: Path, requests: list[Any], ranks: Ranks) -> dict[str, Any]:
    """One summary from every rank's record, cases in request order; rank records are then removed."""
    records: dict[str, dict[str, Any]] = {}
    for r in range(ranks.world_size):
        path = out / BATCH_DIR / f"rank{r}.json"
        for item in read_json(path).get("cases", []) if path.is_file() else []:
            records[item["case"]] = item
    cases = [
        records.get(r.case, {"case": r.case, "status": "error", "error": "no rank recorded this case"})
        for r in requests
    ]
    summary = {
        "cases": cases,
        "succeeded": sum(c["status"] == "ok" for c in cases),
        "failed": sum(c["status"] != "ok" for c in cases),
        "skipped": sum(bool(c.get("skipped")) for c in cases),
        "world_size": ranks.world_size,
        "seconds": round(sum(c.get("seconds", 0.0) for c in cases if not c.get("skipped")), 3),
    }
    write_json(out / SUMMARY, summary)
    shutil.rmtree(out / BATCH_DIR, ignore_errors=True)
    return summary
