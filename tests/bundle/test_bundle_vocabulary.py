"""One bundle vocabulary: defaults from one table, booleans through ``flag``, the same key names in every bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from lesiondiffusion.settings import DEFAULTS, default
from lesiondiffusion_tools.synthesize import SynthesisSettings, _stage_overrides

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
WEIGHTS = {n: Path(f"/w/{n}.pt") for n in ("vqgan", "lmnet", "linet")}


def parsed(bundle: str, config: str, key: str, **overrides):
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / config))
    parser.update({"bundle_root": str(BUNDLES / bundle), **overrides})
    parser.get_parsed_content("imports")
    return parser.get_parsed_content(key)


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_inference_configs_sample_with_the_defaults_table(preset: str) -> None:
    for network in ("lmnet", "linet"):
        assert parsed(network, "inference.json", "steps", preset=preset) == default(network, "steps", preset)
        assert parsed(network, "inference.json", "guidance_scale", preset=preset) == DEFAULTS[network]["guidance_scale"]
    assert parsed("lmnet", "inference.json", "steps", preset="paper") == 200  # the original's DDIM 200
    assert (
        parsed("lmnet", "inference.json", "guidance_scale") == 1.0
        and parsed("linet", "inference.json", "guidance_scale") == 2.0
    )
    assert (
        parsed("linet", "inference.json", "margin_mm") == 3.0 and parsed("linet", "inference.json", "feather_mm") == 2.0
    )
    assert parsed("preprocess", "inference.json", "crop_margin_mm", preset=preset) == default(
        "preprocess", "crop_margin_mm", preset
    )


def test_synthesize_leaves_each_networks_steps_and_guidance_to_its_bundle() -> None:
    paper = SynthesisSettings(preset="paper")
    for stage in ("lmnet", "linet"):
        over = _stage_overrides(stage, paper, WEIGHTS)
        assert "steps" not in over and "guidance_scale" not in over and over["preset"] == "paper"
    assert _stage_overrides("preprocess", paper, WEIGHTS)["preset"] == "paper"
    given = SynthesisSettings(steps=7, guidance_scale=1.5)
    assert {k: _stage_overrides("lmnet", given, WEIGHTS)[k] for k in ("steps", "guidance_scale")} == {
        "steps": 7,
        "guidance_scale": 1.5,
    }


@pytest.mark.parametrize("bundle", ["vqgan", "lmnet", "linet"])
def test_resume_false_from_the_command_line_does_not_resume(bundle: str, tmp_path: Path) -> None:
    (tmp_path / "checkpoint_last.pt").write_bytes(b"")
    for value, disabled in (("false", True), ("true", False), (False, True)):
        over = {"output_dir": str(tmp_path), "resume": value}
        assert parsed(bundle, "train.json", "checkpoint_handlers#0#_disabled_", **over) is disabled, value


def test_every_network_bundle_checkpoints_resumes_and_gates_ranks_alike() -> None:
    """``checkpoint_objects`` saved atomically by ``LastCheckpointSaver`` and read back by ``CheckpointLoader``
    through ``resume_from``, attached by ``run``; rank-0 handlers switched off by ``_disabled_`` in the
    handler lists themselves, so ``multi_gpu_train.json`` never rewrites them."""
    for bundle in ("vqgan", "lmnet", "linet"):
        config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
        multi = json.loads((BUNDLES / bundle / "configs" / "multi_gpu_train.json").read_text())
        assert config["resume_from"] == "$lesiondiffusion.training.resume_path(@checkpoint_last, @resume)", bundle
        loader, *savers = config["checkpoint_handlers"]
        assert loader["_target_"] == "CheckpointLoader" and loader["_disabled_"] == "$@resume_from is None", bundle
        assert loader["load_path"] == "@resume_from" and loader["load_dict"] == "@checkpoint_objects", bundle
        assert [s["_target_"] for s in savers] == ["lesiondiffusion.training.LastCheckpointSaver"] * 2, bundle
        assert savers[0]["save_dict"] == "@checkpoint_objects" and savers[1]["filename"] == "model.pt", bundle
        assert all(s["_disabled_"] == "$not @is_rank0" for s in savers), bundle
        assert "trainer" in config["checkpoint_objects"], bundle
        assert config["run"][0] == "$[h.attach(@train#trainer) for h in @checkpoint_handlers]", bundle
        assert config["is_rank0"] == "$@rank == 0" and "rank" not in multi, bundle
        assert not {"train#handlers", "validate#handlers"} & set(multi), bundle
        assert "$idist.sync()" in multi["initialize"], bundle  # ignite's context made by every rank at once
        for stage in ("train", "validate"):
            for handler in (h for h in config[stage]["handlers"] if isinstance(h, dict)):  # not "@ema"
                gated = "@is_rank0" in str(handler.get("_disabled_", ""))
                assert gated == (handler["_target_"] != "ValidationHandler"), (bundle, stage, handler["_target_"])


def test_every_bundle_names_its_last_checkpoint_and_finetune_weights_alike() -> None:
    for bundle in ("vqgan", "lmnet", "linet"):
        config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
        assert "checkpoint_last" in config and config["finetune_from"] is None and "crop_size" in config, bundle
        assert not {"ckpt_last", "last_checkpoint", "is_not_rank0", "crop"} & set(config), bundle
    for bundle in ("lmnet", "linet"):
        assert "crop_size" in json.loads((BUNDLES / bundle / "configs" / "inference.json").read_text()), bundle


def test_the_diffusion_bundles_name_their_training_pieces_as_the_model_zoo_does() -> None:
    """``train#dataset`` ... ``validate#evaluator``: the ids MONAI's bundle workflows and the zoo use, in both
    diffusion bundles (a ``--train#trainer#max_epochs`` override means the same thing in each)."""
    from monai.bundle import ConfigParser

    ids = ("train#dataset", "train#dataloader", "train#handlers", "train#trainer", "train#preprocessing",
           "train#random_transforms", "validate#dataset", "validate#dataloader", "validate#handlers",
           "validate#evaluator", "validate#preprocessing", "deterministic_transforms", "checkpoint_objects#trainer")  # fmt: skip
    for bundle in ("lmnet", "linet"):
        parser = ConfigParser()
        parser.read_config(BUNDLES / bundle / "configs" / "train.json")
        assert all(i in parser for i in ids), [i for i in ids if i not in parser]
        assert parser["checkpoint_objects#trainer"] == "@train#trainer" and "@train#trainer" in parser["run"][0]
        assert not {"trainer", "evaluator", "handlers", "train_ds", "val_ds", "train_loader", "val_loader"} & set(
            parser.config
        )


@pytest.mark.parametrize("bundle", ["lmnet", "linet"])
def test_inference_is_a_monai_evaluator_over_a_dataset_of_the_manifests_cases(bundle: str) -> None:
    """Inference reads like the zoo's: ``dataset`` -> ``dataloader`` -> ``evaluator`` with ``handlers``, the
    manifest written by a handler, and ``run`` is the evaluator's run."""
    from pydoc import locate

    from monai.engines import Evaluator

    from lesiondiffusion.pipelines.cases import CaseEvaluator, ManifestWriter

    parser = ConfigParser()
    parser.read_config(BUNDLES / bundle / "configs" / "inference.json")
    assert parser["run"] == ["$@evaluator.run()"]
    assert parser["dataset"]["_target_"] == "Dataset" and parser["dataloader"]["dataset"] == "@dataset"
    evaluator = parser["evaluator"]
    assert evaluator["val_data_loader"] == "@dataloader" and evaluator["val_handlers"] == "@handlers"
    target = locate(evaluator["_target_"])
    assert target is CaseEvaluator and issubclass(target, Evaluator)
    assert [h["_target_"] for h in parser["handlers"]][-1].endswith(ManifestWriter.__name__)


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_every_bundle_reads_its_network_sizes_from_the_one_presets_table(preset: str) -> None:
    from lesiondiffusion.networks.presets import PRESETS

    for network in ("lmnet", "linet"):
        table = PRESETS[network][preset]
        for config in ("train.json", "inference.json"):
            assert "presets" not in json.loads((BUNDLES / network / "configs" / config).read_text())
            for key in ("channels", "crop_size", "condition_dim", "num_res_blocks", "norm_num_groups"):
                assert parsed(network, config, key, preset=preset) == table[key], (network, config, key)
        unet = parsed(network, "inference.json", "network_def", preset=preset, weights="")
        assert tuple(unet.unet.block_out_channels) == tuple(table["channels"])
    vqgan = PRESETS["vqgan"][preset]
    assert parsed("vqgan", "train.json", "crop_size", preset=preset) == list(vqgan["crop_size"])
    assert parsed("vqgan", "train.json", "lr", preset=preset) == vqgan["lr"]
    assert parsed("vqgan", "inference.json", "roi_size", preset=preset) == list(vqgan["crop_size"])
    # one size overridden on its own, as on the command line (--channels "[8,16,16]"): the rest stay the preset's
    assert parsed("linet", "inference.json", "channels", preset=preset, channels=[8, 16, 16]) == [8, 16, 16]


def test_an_unknown_preset_is_one_line_naming_the_network_and_the_choices() -> None:
    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.networks.presets import preset

    for network, name in (("lmnet", "LMNet"), ("linet", "LINet"), ("vqgan", "VQ-GAN")):
        with pytest.raises(LesionDiffusionError, match=f"unknown {name} preset 'gpu'; choose one of 'cpu', 'paper'$"):
            preset(network, "gpu")
