"""A lesion described in one sentence: the offline reader, the openai reader against a local chat
server, and ``lesiondiffusion synthesize --text`` on the real TotalSegmentator CT crop.

The synthesis run uses the shipped weights with two sampling steps. The crop's organ map is
TotalSegmentator v2; until v2 maps are detected by themselves the run says so with
``--bundle_overrides '{"preprocess": {"organ_seg_version": "v2"}}'``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import GENERIC_KIND, lesion_kind, parse_lesion_size
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.labels import label_table
from lesiondiffusion.report import parse_ct_value, validate_report
from lesiondiffusion.reports import providers as llm
from lesiondiffusion.text import LESION_WORDS, TextError, answer_schema, read_description
from lesiondiffusion_tools.synthesize import TEXT_ATTRIBUTE, TEXT_READING_ATTRIBUTE, gather_requests, read_texts

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "tests" / "data" / "ts_small"
KEY = "sk-text-SECRET-42"

HYPO, HYPER, ISO = "hypodense lesion,", "hyperdense lesion,", "isodense lesion,"
WELL, ILL = "well-defined margin,", "ill-defined margin,"
DEC, INC = "presence of decreased density areas,", "presence of increased density areas,"
LUMEN, WALL = "within the lumen of a hollow organ", "wall thickening"


def hu(value: float) -> str:
    return f"Mean density of the lesion region is approximately {value:.1f} HU,"


# sentence -> the request attributes it must give (exactly these keys)
PHRASINGS = [
    ("a 25 mm hypodense, round-like, well-defined cyst in the liver",
     {"organ type": "liver", "lesion type": "cyst", "density": HYPO, "shape": "round-like,", "surface characteristics": WELL, "size": "25 mm"}),
    ("A 2.5 cm hypodense lesion in the liver", {"organ type": "liver", "lesion type": "lesion", "density": HYPO, "size": "25 mm"}),
    ("25mm hyperdense nodule in the spleen", {"organ type": "spleen", "lesion type": "nodule", "density": HYPER, "size": "25 mm"}),
    ("a 25 x 18 mm heterogeneous mass in the pancreas",
     {"organ type": "pancreas", "lesion type": "mass", "density variations": "heterogeneous,", "size": "25 x 18 x 18 mm"}),
    ("3 cm x 2 cm x 2 cm lobulated tumour of the left kidney",
     {"organ type": "kidney left", "lesion type": "tumour", "shape": "irregular,", "size": "30 x 20 x 20 mm"}),
    ("Right renal cyst, 12 mm, homogeneous, about 5 HU",
     {"organ type": "kidney right", "lesion type": "cyst", "density variations": "homogeneous,", "size": "12 mm", "CT value": hu(5)}),
    ("hepatic haemangioma measuring 30 mm, hyperdense, sharply defined",
     {"organ type": "liver", "lesion type": "haemangioma", "density": HYPER, "surface characteristics": WELL, "size": "30 mm"}),
    ("a hemangioma of the liver, 2 x 1.5 cm", {"organ type": "liver", "lesion type": "hemangioma", "size": "20 x 15 x 15 mm"}),
    ("an ill-defined hypoattenuating hepatic metastasis with central necrosis",
     {"organ type": "liver", "lesion type": "metastasis", "density": HYPO, "surface characteristics": ILL, "specific features": DEC}),
    ("a splenic abscess with rim enhancement", {"organ type": "spleen", "lesion type": "abscess", "density": "ring enhancement,"}),
    ("pancreatic cyst, fluid density, no calcification",
     {"organ type": "pancreas", "lesion type": "cyst", "density": "hypoattenuating fluid-like lesion,"}),
    ("a polypoid tumor in the urinary bladder",
     {"organ type": "urinary bladder", "lesion type": "tumor", "shape": "protrusion into the lumen,", "cavity": LUMEN}),
    ("irregular wall thickening of the stomach",
     {"organ type": "stomach", "lesion type": "lesion", "shape": "irregular wall thickening,", "cavity": WALL}),
    ("a bladder tumour with irregular wall thickening",
     {"organ type": "urinary bladder", "lesion type": "tumour", "shape": "irregular wall thickening,", "cavity": WALL}),
    ("a calcified nodule in the right lower lobe", {"organ type": "lung lower lobe right", "lesion type": "nodule", "specific features": INC}),
    ("an 8 mm ground-glass nodule in the left upper lobe",
     {"organ type": "lung upper lobe left", "lesion type": "nodule", "density": "low-density ground-glass opacity,", "size": "8 mm"}),
    ("a spiculated mass in the right upper lobe of the lung",
     {"organ type": "lung upper lobe right", "lesion type": "mass", "specific features": "spiculated margins,"}),
    ("pulmonary nodule in the left lung, lower lobe, 9 mm", {"organ type": "lung lower lobe left", "lesion type": "nodule", "size": "9 mm"}),
    ("a part-solid nodule in the RML",
     {"organ type": "lung middle lobe right", "lesion type": "nodule",
      "density": "isodense soft tissue mass with peripheral low-density ground-glass opacity,"}),
    ("a 6 mm stone in the gall bladder", {"organ type": "gallbladder", "lesion type": "stone", "size": "6 mm"}),
    ("a gallbladder calculus", {"organ type": "gallbladder", "lesion type": "stone"}),
    ("a calcification in the spleen", {"organ type": "spleen", "lesion type": "calcification"}),
    ("a cyst in the spleen with a calcification", {"organ type": "spleen", "lesion type": "cyst", "specific features": INC}),
    ("isodense, homogeneous, oval mass in the spleen, approximately 45 HU",
     {"organ type": "spleen", "lesion type": "mass", "density": ISO, "density variations": "homogeneous,", "shape": "round-like,", "CT value": hu(45)}),
    ("an exophytic heterogeneous tumour of the right kidney",
     {"organ type": "kidney right", "lesion type": "tumour", "density variations": "heterogeneous,", "cavity": "protruding from the parenchymal organ"}),
    ("a mixed-density lesion in the liver without calcification or haemorrhage",
     {"organ type": "liver", "lesion type": "lesion", "density": "mixed-density lesion,"}),
    ("a non-contrast CT shows a 4 cm hypodense mass in the liver",
     {"organ type": "liver", "lesion type": "mass", "density": HYPO, "enhancement status": "non-contrast CT,", "size": "40 mm"}),
    ("on contrast-enhanced CT, a 2 cm hyperattenuating lesion in the liver",
     {"organ type": "liver", "lesion type": "lesion", "density": HYPER, "enhancement status": "enhanced CT,", "size": "20 mm"}),
    ("a tumor in the pancreas abutting the duodenum",
     {"organ type": "pancreas", "lesion type": "tumor", "relationship with adjacent organs": "close relationship with adjacent organs,"}),
    ("a cyst in the liver, not abutting adjacent organs",
     {"organ type": "liver", "lesion type": "cyst", "relationship with adjacent organs": "no close relationship with surrounding organs,"}),
    ("a blurred, irregular mass in the colon",
     {"organ type": "colon", "lesion type": "mass", "shape": "irregular,", "surface characteristics": "serosal surface irregularity,"}),
    ("an intraluminal polyp in the colon", {"organ type": "colon", "lesion type": "polyp", "cavity": LUMEN}),
    ("left adrenal adenoma, 18 mm, low attenuation, -5 HU",
     {"organ type": "adrenal gland left", "lesion type": "adenoma", "density": HYPO, "size": "18 mm", "CT value": hu(-5)}),
    ("a hepatic lesion that is not well defined", {"organ type": "liver", "lesion type": "lesion", "surface characteristics": ILL}),
    ("a 1.5 cm round, smooth, homogeneous cyst in the right kidney",
     {"organ type": "kidney right", "lesion type": "cyst", "density variations": "homogeneous,", "shape": "round-like,",
      "surface characteristics": "clear boundary with the renal parenchyma,", "size": "15 mm"}),
    ("a heterogeneous hepatocellular carcinoma in the liver, 5 cm",
     {"organ type": "liver", "lesion type": "hepatocellular carcinoma", "density variations": "heterogeneous,", "size": "50 mm"}),
    ("metastases in the liver, the largest 20 mm", {"organ type": "liver", "lesion type": "metastasis", "size": "20 mm"}),
    ("a tumor with necrosis and haemorrhage in the stomach", {"organ type": "stomach", "lesion type": "tumor", "specific features": DEC + INC}),
    ("kidney_left cyst", {"organ type": "kidney left", "lesion type": "cyst"}),
    # the README's examples
    ("a 3 cm x 2 cm x 2 cm lobulated, heterogeneous tumour of the left kidney without calcification",
     {"organ type": "kidney left", "lesion type": "tumour", "density variations": "heterogeneous,", "shape": "irregular,", "size": "30 x 20 x 20 mm"}),
    ("a spiculated 9 mm nodule in the right lower lobe, about 40 HU",
     {"organ type": "lung lower lobe right", "lesion type": "nodule", "specific features": "spiculated margins,", "size": "9 mm", "CT value": hu(40)}),
    ("a liver lesion without necrosis, with a well-circumscribed margin",
     {"organ type": "liver", "lesion type": "lesion", "surface characteristics": WELL}),
]  # fmt: skip


@pytest.mark.parametrize(("sentence", "expected"), PHRASINGS, ids=[p[0][:40] for p in PHRASINGS])
def test_phrasings_give_their_attributes(sentence: str, expected: dict[str, str]) -> None:
    reading = read_description(sentence)
    assert reading.attributes == expected
    # what the pipeline reads back: one v1 organ, a size and CT value in the forms it accepts
    label_table("v1").id(reading.attributes["organ type"])
    if "size" in expected:
        assert min(parse_lesion_size(expected["size"])) >= 1
    if "CT value" in expected:
        assert parse_ct_value(expected["CT value"]) is not None
    for name in (V.DENSITY, V.DENSITY_VARIATIONS, V.SHAPE, V.SURFACE, V.RELATIONSHIP, V.SPECIFIC, V.ENHANCEMENT):
        if name in expected:
            assert not V.parse_classes(name, expected[name])[1], (name, expected[name])


def test_the_reading_says_which_words_gave_what_and_which_were_not_used() -> None:
    reading = read_description("A 2.5 cm hypodense cyst in segment 7 of the left kidney without calcification, wobbly")
    by_field = {u.field: u.words for u in reading.understood if not u.negated}
    assert by_field == {"organ type": "left kidney", "lesion type": "cyst", "density": "hypodense", "size": "2.5 cm"}
    assert [(u.words, u.field) for u in reading.understood if u.negated] == [("calcification", "specific features")]
    assert reading.unused == ("segment", "7", "wobbly")
    line = reading.summary()
    assert "\n" not in line and "density = hypodense lesion ('hypodense')" in line and "'wobbly'" in line
    assert "negated, not set: 'calcification'" in line
    record = reading.to_json()
    assert (
        record["text"].startswith("A 2.5 cm")
        and record["reader"] == "offline"
        and record["unused_words"] == ["segment", "7", "wobbly"]
    )


@pytest.mark.parametrize(
    ("sentence", "feature_words"),
    [
        ("a tumour in the liver with no calcification", ["calcification"]),
        ("a mass in the pancreas without necrosis", ["necrosis"]),
        ("a tumour of the stomach without necrosis or haemorrhage", ["necrosis", "haemorrhage"]),
        ("a liver mass, no spiculation", ["spiculation"]),
        ("a non-calcified nodule in the right lower lobe", ["calcified"]),
    ],
)
def test_negated_features_are_read_but_not_set(sentence: str, feature_words: list[str]) -> None:
    reading = read_description(sentence)
    assert V.SPECIFIC not in reading.attributes
    assert [u.words for u in reading.understood if u.negated] == feature_words


def test_a_negation_ends_where_its_clause_does() -> None:
    # the margin after "and" belongs to another field; the hypodensity after "non-enhancing" is not negated
    assert (
        read_description("a cyst in the liver with no calcification and a well-defined margin").attributes[V.SURFACE]
        == WELL
    )
    assert read_description("a non-enhancing hypodense lesion in the liver").attributes[V.DENSITY] == HYPO


@pytest.mark.parametrize(
    ("sentence", "words"),
    [
        ("a hypodense hyperdense cyst in the liver", ["'hypodense' and 'hyperdense' contradict each other"]),
        ("a cyst in the liver and the spleen", ["'liver' and 'spleen' name two different organs"]),
        ("a hepatic cyst in the spleen", ["'hepatic' and 'spleen'"]),
        ("a 2 cm hypodense cyst", ["names no organ"]),
        ("a renal cyst", ["'renal' names more than one organ", "kidney right, kidney left"]),
        ("a nodule in the lung", ["'lung' names more than one organ"]),
        ("a cyst in the prostate", ["'prostate'", "no TotalSegmentator v1 label"]),
        ("a 25 mm cyst in the liver, 30 mm across", ["'25 mm' and '30 mm' give two different values"]),
        ("a cyst of 10 HU in the liver, 40 HU", ["'10 HU' and '40 HU'"]),
        ("a round, irregular mass in the liver", ["'round' and 'irregular' contradict each other"]),
        ("a well-defined, ill-defined mass in the spleen", ["'well-defined' and 'ill-defined'"]),
        ("a homogeneous heterogeneous mass in the spleen", ["'homogeneous' and 'heterogeneous'"]),
        ("a cyst and an abscess in the liver", ["'cyst' and 'abscess' name two different lesions"]),
        ("an exophytic mass in the bladder", ["does not fit the urinary bladder"]),
        ("a 0 mm cyst in the liver", ["not a lesion size"]),
        ("   ", ["empty"]),
    ],
)
def test_sentences_that_cannot_be_one_lesion_are_one_line_naming_the_words(sentence: str, words: list[str]) -> None:
    with pytest.raises(TextError) as err:
        read_description(sentence)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_the_organ_may_come_from_elsewhere() -> None:
    assert read_description("a hypodense cyst", require_organ=False).attributes == {
        "lesion type": "cyst",
        "density": HYPO,
    }


def test_every_lesion_word_is_a_kind_the_report_generator_knows() -> None:
    for lesion in LESION_WORDS:
        if lesion != "lesion":
            assert lesion_kind(lesion) is not GENERIC_KIND, lesion
            assert read_description(f"a {LESION_WORDS[lesion][0]} in the liver").attributes["lesion type"] == lesion


# ---- the openai reader ----------------------------------------------------------------------------------
ANSWER = {
    "organ type": "kidney left", "lesion type": "Cyst", "density": "hypoattenuating fluid-like lesion", "density variations": "homogeneous",
    "shape": ["round-like"], "margin": "well-defined", "relationship with adjacent organs": None, "specific features": [],
    "cavity": "within the parenchymal organ", "enhancement status": None, "size in mm": [25, 18], "CT value in HU": 8,
}  # fmt: skip


class ChatServer:
    """A chat-completions server on 127.0.0.1 answering with the next scripted content (the last repeats)."""

    def __init__(self, contents: list[str]) -> None:
        self.contents, self.requests = contents, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                content = server.contents[min(len(server.requests), len(server.contents)) - 1]
                data = json.dumps({
                    "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                }).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEXT_TEST_KEY", KEY)
    return "TEXT_TEST_KEY"


def preprocess_settings(url: str, key_env: str, on_failure: str = "error") -> dict:
    return {
        "report_base_url": url,
        "report_api_key_env": key_env,
        "report_max_retries": 1,
        "report_on_failure": on_failure,
        "report_timeout": 10,
    }


def test_openai_reads_the_sentence_under_the_schema_after_a_bad_answer(key: str, tmp_path: Path) -> None:
    sentence = "a small cyst in the left renal pole, about 2.5 by 1.8 cm"
    bad = json.dumps({**ANSWER, "density": "purple lesion"})  # breaks the schema: the attempt fails, the retry succeeds
    cases = gather_requests(
        image=str(tmp_path / "ct.nii.gz"),
        text=sentence,
        attributes={"organ type": "kidney left", "density variations": "heterogeneous"},
    )
    assert cases[0].reading.reader == "offline"
    with ChatServer([bad, json.dumps(ANSWER)]) as server:
        read = read_texts(cases, "openai", preprocess_settings(server.url, key))
    assert len(server.requests) == 2 and server.requests[0]["path"] == "/v1/chat/completions"
    assert (
        server.requests[0]["auth"] == f"Bearer {KEY}"
        and server.requests[0]["body"]["messages"][1]["content"] == sentence
    )
    assert server.requests[0]["body"]["response_format"]["json_schema"]["schema"] == answer_schema()
    r = read[0]
    assert r.reading.reader.startswith("openai")
    assert r.reading.attributes == {
        "organ type": "kidney left", "lesion type": "cyst", "density": "hypoattenuating fluid-like lesion,", "density variations": "homogeneous,",
        "shape": "round-like,", "surface characteristics": "clear boundary with the renal parenchyma,", "cavity": "within the parenchymal organ",
        "size": "25 x 18 x 18 mm", "CT value": hu(8),
    }  # fmt: skip
    # the explicit attribute wins over the model's reading; both are kept
    assert r.attributes["density variations"] == "heterogeneous" and r.given == {
        "organ type": "kidney left",
        "density variations": "heterogeneous",
    }
    assert r.provenance()["text_reading"]["attributes"]["density variations"] == "homogeneous,"


def test_openai_failure_falls_back_to_the_offline_reader_or_is_one_error(
    key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sentence = "a 25 mm hypodense cyst in the liver"
    cases = gather_requests(image=str(tmp_path / "ct.nii.gz"), text=sentence)
    with ChatServer(['{"organ type": "liver", "lesion']) as server:  # never valid JSON
        read = read_texts(cases, "openai", preprocess_settings(server.url, key, "offline"))
        assert len(server.requests) == 2  # one try and one retry
        assert read[0].reading.reader == "offline" and read[0].attributes == read_description(sentence).attributes
        with pytest.raises(LesionDiffusionError) as err:
            read_texts(cases, "openai", preprocess_settings(server.url, key, "error"))
    message = str(err.value)
    assert "\n" not in message and "after 2 attempt(s)" in message and "not JSON" in message
    assert KEY not in message and KEY not in caplog.text
    # an answer whose cavity its organ cannot have is no request either
    wrong = json.dumps({**ANSWER, "cavity": "wall thickening"})
    with ChatServer([wrong]) as server, pytest.raises(LesionDiffusionError, match="not a request"):
        llm.read_text(llm.make_provider("openai", base_url=server.url, api_key_env=key, max_retries=0), sentence)


def test_offline_provider_keeps_the_offline_reading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = gather_requests(
        image=str(tmp_path / "ct.nii.gz"), text="a hyperdense nodule in the spleen", lesion_type="hemangioma"
    )
    assert read_texts(cases, "offline", {}) == cases
    assert cases[0].attributes == {"organ type": "spleen", "lesion type": "hemangioma", "density": HYPER}
    printed = capsys.readouterr().out
    assert "'a hyperdense nodule in the spleen' -> offline reading: organ type = spleen ('spleen')" in printed


# ---- synthesize --text on the real CT crop --------------------------------------------------------------
SENTENCE = "a 25 mm hypodense, homogeneous, well-defined cyst in the liver without calcification"


def test_synthesize_text_on_real_ct(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lesiondiffusion_tools.cli import main

    base = [
        "synthesize", "--image", str(SMALL / "example_ct_sm.nii.gz"), "--organ_seg", str(SMALL / "example_seg.nii.gz"),
        "--steps", "2", "--seed", "1", "--verbose", "false",
        # the crop's organ map is TotalSegmentator v2 (until v2 is detected by itself)
        "--bundle_overrides", json.dumps({"preprocess": {"organ_seg_version": "v2"}}),
    ]  # fmt: skip
    # a sentence that contradicts itself: one line, exit 1, no output folder
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--out", str(bad), "--text", "a hypodense hyperdense cyst in the liver"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and not bad.exists()
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: --text: 'hypodense' and 'hyperdense' contradict each other (density: hypodense lesion / hyperdense lesion)"
    ]
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--out", str(bad), "--text", "a cyst"])
    assert exit_.value.code == 1 and "error: --text: names no organ" in capsys.readouterr().err and not bad.exists()

    out = tmp_path / "out"
    # the explicit attribute wins over the sentence ("homogeneous")
    main(
        [
            *base,
            "--out",
            str(out),
            "--text",
            SENTENCE,
            "--attributes",
            json.dumps({"density variations": "heterogeneous"}),
        ]
    )
    printed = capsys.readouterr().out
    assert (
        f"example_ct_sm: {SENTENCE!r} -> offline reading: organ type = liver ('liver'); lesion type = cyst ('cyst')"
        in printed
    )
    case = out / "example_ct_sm"
    assert (case / "image.nii.gz").is_file() and (case / "label.nii.gz").is_file()

    report = json.loads((case / "report.json").read_text())
    validate_report(report, case / "report.json")
    assert list(report) == [str(label_table("v1").id("liver"))]
    attrs = report["5"][2]
    assert attrs[V.DENSITY] == HYPO and attrs[V.SURFACE] == WELL and attrs[V.DENSITY_VARIATIONS] == "heterogeneous"
    assert attrs[V.SIZE] == "[[25 25 25]] pixel" and "stone" not in attrs[V.SPECIFIC]
    assert attrs[TEXT_ATTRIBUTE] == SENTENCE and "negated, not set: 'calcification'" in attrs[TEXT_READING_ATTRIBUTE]

    request = json.loads((case / "provenance.json").read_text())["request"]
    assert request["text"] == SENTENCE and request["given_attributes"] == {"density variations": "heterogeneous"}
    assert request["text_reading"]["attributes"]["density variations"] == "homogeneous,"
    assert request["text_reading"]["understood"][0] == {"words": "liver", "field": "organ type", "value": "liver"}
    assert request["attributes"] == {**read_description(SENTENCE).attributes, "density variations": "heterogeneous"}
