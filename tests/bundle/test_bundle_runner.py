"""Running one bundle config in its own process (``lesiondiffusion_tools.bundle_runner``)."""

from __future__ import annotations

import json
import sys

import pytest

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion_tools.bundle_runner import STAGES, BundleRunError, bundle_command, bundle_root, run_bundle


def test_every_stage_has_a_bundle_and_unknown_stages_are_refused():
    for stage in STAGES:
        assert (bundle_root(stage) / "configs" / "metadata.json").is_file()
    with pytest.raises(LesionDiffusionError, match="unknown stage 'lmnt'"):
        bundle_root("lmnt")


def test_missing_config_is_named_before_anything_runs():
    with pytest.raises(LesionDiffusionError, match="bundle config.s. not found: nowhere.json"):
        run_bundle("preprocess", {}, configs=("inference.json", "nowhere.json"))


def test_several_configs_travel_as_one_json_list(tmp_path):
    root = bundle_root("vqgan")
    cmd = bundle_command(root, ("train.json", "multi_gpu_train.json"), tmp_path / "args.json")
    assert cmd[:4] == [sys.executable, "-m", "monai.bundle", "run"]
    assert json.loads(cmd[cmd.index("--config_file") + 1]) == [
        str(root / "configs" / "train.json"),
        str(root / "configs" / "multi_gpu_train.json"),
    ]
    assert cmd[cmd.index("--args_file") + 1] == str(tmp_path / "args.json")
    single = bundle_command(root, ("inference.json",), tmp_path / "args.json")
    assert single[single.index("--config_file") + 1] == str(root / "configs" / "inference.json")


def test_a_failing_bundle_raises_its_one_line_error_with_the_exit_status(tmp_path):
    # the path has a space and a quote: it must reach the bundle verbatim through the args file
    missing = tmp_path / "no such 'scan'.nii.gz"
    out = tmp_path / "out"
    with pytest.raises(BundleRunError) as info:
        run_bundle(
            "preprocess",
            {
                "image": str(missing),
                "attributes": {"organ type": "liver", "lesion type": "cyst"},
                "output_dir": str(out),
                "organ_seg": None,
            },
            capture=True,
        )
    assert info.value.returncode == 1
    message = str(info.value)
    assert message.startswith("error: ") and str(missing) in message and "\n" not in message
    assert not out.exists()


def test_stderr_reaches_the_terminal_unless_captured(tmp_path, capfd):
    missing = tmp_path / "missing.nii.gz"
    overrides = {
        "image": str(missing),
        "attributes": {"organ type": "liver", "lesion type": "cyst"},
        "output_dir": str(tmp_path / "o"),
    }
    with pytest.raises(BundleRunError) as echoed:
        run_bundle("preprocess", overrides)
    assert str(echoed.value) in capfd.readouterr().err.splitlines()
    with pytest.raises(BundleRunError) as quiet:
        run_bundle("preprocess", overrides, capture=True)
    assert str(quiet.value) == str(echoed.value) and capfd.readouterr().err == ""


def test_preprocess_options_become_bundle_overrides(tmp_path, monkeypatch):
    from lesiondiffusion_tools.preprocess import bundle_overrides

    monkeypatch.chdir(tmp_path)
    (tmp_path / "attrs.json").write_text('{"organ type": "liver", "lesion type": "cyst"}')
    got = bundle_overrides(
        out="out", image="ct.nii.gz", organ_seg=None, attributes="attrs.json", seed="3", overwrite=1, totalseg_fast=True
    )
    assert got == {
        "output_dir": str(tmp_path / "out"), "image": str(tmp_path / "ct.nii.gz"), "attributes": str(tmp_path / "attrs.json"),
        "seed": 3, "overwrite": True, "totalseg_fast": True,
    }  # fmt: skip
    # every list file is found from where the command ran, though the bundle runs in its own folder
    lists = bundle_overrides(out="o", image_list="i.txt", organ_seg_version_list="v.txt", case_list="names.txt")
    assert [lists[k] for k in ("image_list", "organ_seg_version_list", "case_list")] == [
        str(tmp_path / n) for n in ("i.txt", "v.txt", "names.txt")
    ]
    text = '{"organ type": "bladder", "lesion type": "polyp"}'
    assert bundle_overrides(out="o", attributes=text)["attributes"] == text  # JSON text passes as written
    # flags typed on the command line arrive as words
    assert bundle_overrides(out="o", overwrite="false")["overwrite"] is False
    assert bundle_overrides(out="o", overwrite="true")["overwrite"] is True
    with pytest.raises(LesionDiffusionError, match="expected true or false"):
        bundle_overrides(out="o", overwrite="maybe")
    with pytest.raises(LesionDiffusionError, match="give the output folder: --out DIR"):
        bundle_overrides(image="ct.nii.gz")


def test_failure_message_prefers_the_bundle_error_line_then_how_it_ended():
    from lesiondiffusion_tools.bundle_runner import failure_message

    log = "INFO loading\nerror: /x/ct.nii.gz: not a NIfTI file\nsampling:  10%|#  | 1/10\r"
    assert failure_message("lmnet", log, 1) == "error: /x/ct.nii.gz: not a NIfTI file"
    assert (
        failure_message("lmnet", "sampling:  10%|#  | 1/10\r", -9) == "error: the lmnet bundle was stopped by signal 9"
    )
    assert (
        failure_message("linet", "Traceback ...\nValueError: boom\n", 1)
        == "error: the linet bundle failed (exit status 1): ValueError: boom"
    )
