"""Attribute conditioning: report -> condition tensor, attribute dropout, vocab and BiomedCLIP encoders."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from monai.transforms import Compose

from lesiondiffusion import vocabulary as V
from lesiondiffusion.conditioning import (
    BiomedCLIPConditionEncoder,
    ConditionSpec,
    IntensityHint,
    RandConditionDropoutd,
    ReportConditiond,
    TextEmbeddingCache,
    VocabConditionEncoder,
    build_condition_encoder,
    lesion_attributes,
    null_condition,
)
from lesiondiffusion.errors import InputError, LesionDiffusionError

LIVER = {
    V.ENHANCEMENT: "enhanced CT,",
    V.LOCATION: "5",
    V.SHAPE: "irregular,",
    V.SURFACE: "ill-defined margin,",
    V.RELATIONSHIP: "no close relationship with surrounding organs,",
    V.SPECIFIC: "presence of increased density areas,presence of decreased density areas,",
    V.DENSITY: "low density lesion,",
    V.CT_VALUE: "Mean density of the lesion region is approximately 57 HU,",
    V.SIZE: "[[28 29 26]] pixel,",
}
ALL_FIELDS = V.IMAGE_FIELDS + (V.SIZE,)


def test_encode_parses_synonyms_organs_and_numbers():
    spec = ConditionSpec(ALL_FIELDS)
    decoded = spec.decode(spec.encode(LIVER))
    assert decoded[V.LOCATION] == ["liver"]
    assert decoded[V.DENSITY] == ["hypodense lesion"]  # synonym -> canonical class
    assert decoded[V.SPECIFIC] == ["presence of increased density areas", "presence of decreased density areas"]
    assert decoded[V.CT_VALUE] == [57.0]
    assert decoded[V.SIZE] == [28.0, 29.0, 26.0]
    assert decoded[V.CAVITY] is None and decoded[V.DENSITY_VARIATIONS] is None  # absent -> unknown
    # an organ name gives the same id as the number; a group word gives all its organs
    assert spec.decode(spec.encode({V.LOCATION: "Liver"}))[V.LOCATION] == ["liver"]
    assert spec.decode(spec.encode({V.LOCATION: "kidney"}))[V.LOCATION] == ["kidney right", "kidney left"]


def test_unknown_values_are_ignored_with_a_warning(caplog):
    spec = ConditionSpec()
    with caplog.at_level(logging.WARNING):
        cond = spec.encode({V.SHAPE: "round-like, banana-shaped", V.LOCATION: "spleeen"})
    assert spec.decode(cond)[V.SHAPE] == ["round-like"]
    assert spec.decode(cond)[V.LOCATION] is None
    assert "banana-shaped" in caplog.text and "spleeen" in caplog.text


def test_changing_an_attribute_changes_the_tensor_and_the_embedding():
    spec = ConditionSpec()
    a = spec.encode(LIVER)
    b = spec.encode({**LIVER, V.SHAPE: "round-like,"})
    changed = (a != b).any(dim=1)
    assert changed.tolist() == [f == V.SHAPE for f in spec.fields]
    torch.manual_seed(0)
    encoder = VocabConditionEncoder(dim=16)
    ea, eb = encoder(torch.stack([a, b])).unbind(0)
    row = spec.fields.index(V.SHAPE)
    assert not torch.allclose(ea[row], eb[row])
    others = [i for i in range(len(spec.fields)) if i != row]
    assert torch.allclose(ea[others], eb[others])


def test_report_transform_reads_type_json_in_a_monai_pipeline(tmp_path):
    path = tmp_path / "type.json"
    path.write_text(json.dumps({"5": ["", "", LIVER], "104": ["", "", {**LIVER, V.LOCATION: "104"}]}))
    pipeline = Compose([ReportConditiond(keys="report", fields=V.MASK_FIELDS)])
    out = pipeline({"report": str(path), "organ_id": 104})
    assert out["condition"].shape == (len(V.MASK_FIELDS), 4)
    assert ConditionSpec().decode(out["condition"])[V.LOCATION] == ["urinary bladder"]
    with pytest.raises(InputError, match="type.json.*2 lesion entries"):
        ReportConditiond()({"report": str(path)})
    with pytest.raises(InputError, match="no lesion entry for organ 3"):
        lesion_attributes(path, 3)


def test_attribute_dropout_rows_and_whole_condition():
    cond = ConditionSpec().encode(LIVER)
    keep_all = RandConditionDropoutd(prob_attribute=0.0, prob_all=0.0)
    assert torch.equal(keep_all({"condition": cond})["condition"], cond)
    assert not RandConditionDropoutd(prob_attribute=0.0, prob_all=1.0)({"condition": cond})["condition"].any()
    assert not RandConditionDropoutd(prob_attribute=1.0, prob_all=0.0)({"condition": cond})["condition"].any()
    some = RandConditionDropoutd(prob_attribute=0.5, prob_all=0.0)
    some.set_random_state(seed=1)
    outs = [some({"condition": cond})["condition"] for _ in range(20)]
    dropped = torch.stack([(o == 0).all(dim=1) & cond.any(dim=1) for o in outs])
    assert 0 < dropped.float().mean() < 1  # rows go independently
    for o in outs:  # a kept row is unchanged, a dropped row is all zeros
        kept = o.any(dim=1)
        assert torch.equal(o[kept], cond[kept])
    again = RandConditionDropoutd(prob_attribute=0.5, prob_all=0.0)
    again.set_random_state(seed=1)
    assert all(torch.equal(again({"condition": cond})["condition"], o) for o in outs)


def test_vocab_encoder_shapes_null_vectors_pooling_and_gradients():
    spec = ConditionSpec(ALL_FIELDS)
    torch.manual_seed(0)
    encoder = build_condition_encoder("vocab", ALL_FIELDS, dim=24)
    cond = spec.encode(LIVER)
    out = encoder(torch.stack([cond, null_condition(cond)]))
    assert out.shape == (2, len(ALL_FIELDS), 24)
    # unknown attributes all map to the learned null vectors: two empty conditions agree
    assert torch.allclose(encoder(torch.zeros(1, *spec.shape)), out[1:])
    # multi-valued fields are pooled: the order of the classes does not matter
    swapped = cond.clone()
    row = spec.fields.index(V.SPECIFIC)
    swapped[row, :2] = cond[row, :2].flip(0)
    assert torch.allclose(encoder(swapped[None]), out[:1], atol=1e-6)
    # a different HU value changes the CT-value embedding
    hotter = spec.encode({**LIVER, V.CT_VALUE: "approximately 120 HU"})
    hu_row = spec.fields.index(V.CT_VALUE)
    assert not torch.allclose(encoder(hotter[None])[0, hu_row], out[0, hu_row])
    out.sum().backward()
    assert encoder.classes.weight.grad is not None and encoder.classes.weight.grad.abs().sum() > 0
    with pytest.raises(LesionDiffusionError, match="condition must be"):
        encoder(torch.zeros(1, 3, 4))


def _fake_tower(calls: list[list[str]]):
    """A deterministic stand-in for the text tower: a vector from each string's characters."""

    def embed(strings: list[str]) -> torch.Tensor:
        calls.append(list(strings))
        out = torch.zeros(len(strings), 8)
        for i, s in enumerate(strings):
            for j, ch in enumerate(s.encode()):
                out[i, j % 8] += ch / 100.0
        return out

    return embed


def test_text_embedding_cache_embeds_each_string_once_and_persists(tmp_path):
    calls: list[list[str]] = []
    cache = TextEmbeddingCache(_fake_tower(calls), tmp_path / "cache.pt")
    a = cache(["liver", "cyst", "liver"])
    assert calls == [["liver", "cyst"]]
    assert torch.equal(a[0], a[2])
    cache(["cyst", "kidney"])
    assert calls[-1] == ["kidney"]
    reloaded = TextEmbeddingCache(None, tmp_path / "cache.pt")  # no tower at all
    assert torch.equal(reloaded(["liver", "kidney"]), torch.stack([a[0], cache(["kidney"])[0]]))
    with pytest.raises(LesionDiffusionError, match="no text encoder"):
        reloaded(["spleen"])


def test_biomedclip_encoder_table_travels_in_the_state_dict():
    calls: list[list[str]] = []
    torch.manual_seed(0)
    encoder = BiomedCLIPConditionEncoder(dim=16, text_encoder=_fake_tower(calls), text_dim=8)
    cond = ConditionSpec().encode(LIVER)[None]
    out = encoder(cond)
    assert out.shape == (1, len(V.MASK_FIELDS), 16)
    assert len(calls) == 1 and len(calls[0]) == encoder.num_classes_total  # every class string, once
    encoder(cond)
    assert len(calls) == 1
    fresh = BiomedCLIPConditionEncoder(dim=16, text_dim=8)  # no tower, no weights path
    with pytest.raises(LesionDiffusionError, match="biomedclip_path"):
        fresh(cond)
    fresh.load_state_dict(encoder.state_dict())
    assert torch.allclose(fresh(cond), out)


def test_biomedclip_needs_local_weights_and_open_clip(tmp_path):
    with pytest.raises(InputError, match="not found; set biomedclip_path"):
        build_condition_encoder("biomedclip", biomedclip_path=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    encoder = build_condition_encoder("biomedclip", biomedclip_path=empty, dim=8)
    with pytest.raises(InputError, match="open_clip_config.json"):
        encoder(torch.zeros(1, *ConditionSpec().shape))
    (empty / "open_clip_config.json").write_text("{}")
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(LesionDiffusionError, match="pip install open_clip_torch"):
            build_condition_encoder("biomedclip", biomedclip_path=empty, dim=8)(torch.zeros(1, *ConditionSpec().shape))
    with pytest.raises(LesionDiffusionError, match="unknown condition encoder"):
        build_condition_encoder("clip")


def test_intensity_hint_paints_the_ct_value_into_the_mask_and_drops_with_it():
    spec = ConditionSpec(V.IMAGE_FIELDS)
    dark, bright = (
        spec.encode({**LIVER, V.CT_VALUE: f"Mean density of the lesion region is approximately {hu} HU,"})
        for hu in (20, 90)
    )
    cond = torch.stack([dark, bright, null_condition(dark)])
    mask = torch.zeros(3, 1, 6, 6, 6)
    mask[:, :, 2:4, 1:5, 2:5] = 1
    extra = torch.cat([mask, torch.rand(3, 2, 6, 6, 6)], dim=1)  # the mask is channel 0 of several
    hint = IntensityHint(V.IMAGE_FIELDS)(cond, extra)
    assert hint.shape == (3, IntensityHint.channels, 6, 6, 6) and type(hint) is torch.Tensor
    inside = mask[0, 0] > 0
    for i, hu in enumerate((20.0, 90.0)):
        assert torch.equal(hint[i, 0], mask[i, 0])  # known: the mask itself
        assert torch.allclose(hint[i, 1][inside], torch.full((int(inside.sum()),), hu / 100.0))  # in units of 100 HU
        assert not hint[i, :, ~inside].any()  # nothing outside the mask
    assert hint[1, 1][inside].min() > hint[0, 1][inside].max()  # brighter request, brighter hint
    assert not hint[2].any()  # null condition (guidance) / dropped CT value: no hint
    dropped = RandConditionDropoutd(prob_attribute=1.0, prob_all=0.0)
    dropped.set_random_state(0)
    assert not IntensityHint(V.IMAGE_FIELDS)(dropped({"condition": dark})["condition"][None], extra[:1]).any()
    assert not IntensityHint(V.IMAGE_FIELDS)(None, extra).any()
    with pytest.raises(LesionDiffusionError, match="CT value"):
        IntensityHint(V.MASK_FIELDS)
