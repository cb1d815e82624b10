"""The preprocess bundle as a MONAI bundle: metadata against the official schema, offline; config names."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, verify_metadata

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "preprocess"
CONFIGS = BUNDLE / "configs"
SCHEMA = ROOT / "lesiondiffusion" / "resources" / "meta_schema_20240725.json"


def test_bundle_layout():
    for name in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/logging.conf",
                 "docs/README.md", "LICENSE", "scripts/__init__.py"):  # fmt: skip
        assert (BUNDLE / name).is_file(), name


def test_metadata_verifies_offline_and_a_broken_one_does_not(tmp_path):
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))  # raises on any error
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    broken_metas = (
        ({**meta, "version": None}, "None is not of type 'string'"),
        ({k: v for k, v in meta.items() if k != "network_data_format"}, "'network_data_format' is a required property"),
    )
    for broken, problem in broken_metas:
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=f"^{re.escape(problem)}"):
            verify_metadata(meta_file=str(tmp_path / "bad.json"), filepath=str(SCHEMA))


def test_metadata_versions_are_the_installed_ones():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["monai_version"] == metadata.version("monai")
    assert meta["pytorch_version"] == metadata.version("torch").split("+")[0]
    assert meta["numpy_version"] == metadata.version("numpy")
    for package, version in meta["required_packages_version"].items():
        assert metadata.version(package) == version, package
    assert meta["version"] in meta["changelog"]


def parsed(config: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / config))
    parser.update(overrides)
    return parser


def test_configs_use_the_shared_setting_names():
    inference = parsed("inference.json")
    for key in ("output_dir", "seed", "device"):
        assert key in inference.config, key
    train = parsed("train.json")
    for key in ("datalist", "output_dir", "seed"):
        assert key in train.config, key
    # the split follows ``seed``; the older name still overrides it
    assert parsed("train.json", seed=7).get_parsed_content("split_seed") == 7
    assert parsed("train.json", split_seed=3).get_parsed_content("split_seed") == 3
    assert train.config["writer"]["split_seed"] == "@split_seed"


def test_user_errors_end_the_run_as_one_line(capsys):
    from lesiondiffusion.errors import InputError, exit_on_user_error

    def bad() -> None:
        raise InputError("/data/ct.nii.gz", "unreadable\nNIfTI")

    assert exit_on_user_error(lambda: 5, "test") == 5
    with pytest.raises(SystemExit) as info:
        exit_on_user_error(bad, "test")
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: /data/ct.nii.gz: unreadable NIfTI\n"
    with pytest.raises(InputError):  # from Python: the error itself
        exit_on_user_error(bad, "test", enabled=False)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        exit_on_user_error(lambda: 1 / 0, "test")
