"""The ``openai`` report provider against a real chat-completions HTTP server on 127.0.0.1.

The server (stdlib ``http.server`` in a thread) answers each request with the next scripted behaviour:
a good answer, malformed JSON, an answer that breaks the schema, HTTP 500, or a late answer (timeout).
The provider talks to it through the real ``openai`` client.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion import vocabulary as V
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.labels import label_table
from lesiondiffusion.report import parse_ct_value
from lesiondiffusion.reports import extraction
from lesiondiffusion.reports import providers as llm
from lesiondiffusion.reports.generation import OfflineReportProvider, complete_report

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "preprocess"
KEY = "sk-test-SECRET-0123456789"

GOOD = {
    "enhancement status": "enhanced CT",
    "shape": ["round-like"],
    "size": [20, 18, 12],
    "density": "hypoattenuating fluid-like lesion",
    "density variations": "homogeneous",
    "CT value": 8,
    "surface characteristics": "well-defined margin",
    "relationship with adjacent organs": "no close relationship with surrounding organs",
    "specific features": [],
    "cavity": "within the parenchymal organ",
}
# answers for the real non-contrast scan (liver ~46 HU): one that agrees, two that contradict it
PLAIN_GOOD = {**GOOD, "enhancement status": "non-contrast CT"}
HYPO_NOT_BELOW = {**PLAIN_GOOD, "density": "hypodense lesion", "CT value": 50}


class ChatServer:
    """A chat-completions server: ``script`` lists one behaviour per request (the last one repeats)."""

    def __init__(self, script: list[str], delay: float = 0.0) -> None:
        self.script = list(script)
        self.delay = delay
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(
                    {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                )
                behaviour = server.script[min(len(server.requests), len(server.script)) - 1]
                if behaviour == "http500":
                    # a careless server that echoes the credentials it got
                    self._send(
                        500,
                        {
                            "error": {
                                "message": f"internal error for {self.headers['Authorization']}",
                                "type": "server_error",
                            }
                        },
                    )
                    return
                if behaviour == "slow":
                    time.sleep(server.delay)
                content = {
                    "good": json.dumps(GOOD),
                    "slow": json.dumps(GOOD),
                    "fenced": "```json\n" + json.dumps(GOOD) + "\n```",
                    "malformed": '{"shape": ["round-like"], "size": [20, 18',
                    "wrong_schema": json.dumps({**GOOD, "density": "purple lesion", "cavity": "wall thickening"}),
                    "plain_good": json.dumps(PLAIN_GOOD),
                    "hypo_not_below": json.dumps(HYPO_NOT_BELOW),
                }[behaviour]
                self._send(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)  # everything: our logger, openai's, httpx's
    return caplog


REQUEST = {"organ type": "liver", "lesion type": "cyst"}


def propose(server: ChatServer, **kwargs) -> dict[str, str]:
    provider = llm.OpenAIReportProvider(**{"base_url": server.url, "model": "test-model", "timeout": 5.0, **kwargs})
    return provider.propose(REQUEST, "liver", np.random.default_rng(0), organ_box_size=(120, 100, 90))


def test_good_answer_request_path_schema_and_key(key, logs):
    # the original appended /chat/completions to a URL that already had it: a full URL must still work
    with ChatServer(["good"]) as server:
        out = propose(server, base_url=server.url + "/chat/completions/")
    assert len(server.requests) == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "test-model" and isinstance(body["seed"], int)
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    assert set(schema["required"]) == set(V.REPORT_FIELDS + V.OPTIONAL_FIELDS) - {V.LOCATION}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["cavity"]["enum"] == [V.CAVITY_WITHIN, V.CAVITY_PROTRUDING]  # the liver is solid
    assert set(schema["properties"]["density"]["enum"]) == set(V.classes("density"))
    assert schema["properties"]["size"]["items"]["maximum"] == 120
    assert "cyst" in body["messages"][1]["content"] and "liver" in body["messages"][1]["content"]
    assert out == {
        "enhancement status": "enhanced CT,",
        "shape": "round-like,",
        "size": "[[12 18 20]] pixel",  # the report lists the axes reversed (the original's files)
        "density": "hypoattenuating fluid-like lesion,",
        "density variations": "homogeneous,",
        "CT value": "Mean density of the lesion region is approximately 8.0 HU,",
        "surface characteristics": "well-defined margin,",
        "relationship with adjacent organs": "no close relationship with surrounding organs,",
        "specific features": "",
        "cavity": "within the parenchymal organ",
    }
    assert KEY not in logs.text and KEY not in json.dumps(out)


def test_answer_merged_with_the_users_fields(key):
    with ChatServer(["good"]) as server:
        request = {**REQUEST, "density variations": "heterogeneous", "size": "30 mm"}
        provider = llm.make_provider("openai", base_url=server.url, model="m", timeout=5.0, max_retries=None)
        rng = np.random.default_rng(1)
        proposed = provider.propose(request, "liver", rng, organ_box_size=(120, 100, 90))
    report = complete_report(request, 5, (120, 100, 90), proposed, rng)
    assert report.attributes["density variations"] == "heterogeneous"  # the user wins
    assert report.attributes["density"] == "hypoattenuating fluid-like lesion,"  # the server's answer
    assert report.array_box()[1] == (30, 30, 30)
    # the request told the server which fields are fixed
    assert "heterogeneous" in server.requests[0]["body"]["messages"][1]["content"]


def test_fenced_json_is_accepted(key):
    with ChatServer(["fenced"]) as server:
        out = propose(server)
    assert out["density"] == "hypoattenuating fluid-like lesion,"


@pytest.mark.parametrize(
    "behaviour, reason",
    [("malformed", "the answer is not JSON"), ("wrong_schema", "does not follow the schema"), ("http500", "HTTP 500")],
)
def test_failures_are_retried_then_one_clear_error(key, logs, behaviour, reason):
    with ChatServer([behaviour]) as server:
        with pytest.raises(LesionDiffusionError) as err:
            propose(server, max_retries=2)
    assert len(server.requests) == 3  # one attempt + two retries, no more
    message = str(err.value)
    assert "\n" not in message and reason in message and "after 3 attempt(s)" in message
    assert KEY not in message and KEY not in logs.text
    assert sum("attempt" in r.getMessage() and r.levelno == logging.WARNING for r in logs.records) == 3


def test_a_failure_then_a_good_answer_succeeds(key):
    with ChatServer(["malformed", "wrong_schema", "good"]) as server:
        out = propose(server, max_retries=2)
    assert len(server.requests) == 3 and out["CT value"].endswith("8.0 HU,")


def test_timeout(key, logs):
    with ChatServer(["slow"], delay=2.0) as server:
        start = time.monotonic()
        with pytest.raises(LesionDiffusionError, match=r"no answer within 0.3 s") as err:
            propose(server, timeout=0.3, max_retries=1)
        elapsed = time.monotonic() - start
    assert len(server.requests) == 2
    assert elapsed < 1.9  # two attempts of 0.3 s, not the server's 2 s
    assert KEY not in str(err.value) and KEY not in logs.text


def test_offline_fallback(key, logs):
    with ChatServer(["http500"]) as server:
        out = propose(server, max_retries=1, on_failure="offline")
    assert len(server.requests) == 2
    assert "using the offline provider" in logs.text and KEY not in logs.text
    # a complete proposal, consistent with a liver cyst
    assert set(out) == set(V.REPORT_FIELDS + V.OPTIONAL_FIELDS) - {V.LOCATION}
    assert out["density"] == "hypoattenuating fluid-like lesion,"
    assert out["cavity"] in (V.CAVITY_WITHIN, V.CAVITY_PROTRUDING)


def test_missing_key(monkeypatch, logs):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ChatServer(["good"]) as server:
        with pytest.raises(LesionDiffusionError, match="OPENAI_API_KEY is not set"):
            propose(server)
        out = propose(server, on_failure="offline")
    assert server.requests == []
    assert out["density"] == "hypoattenuating fluid-like lesion,"


def test_make_provider_and_settings():
    assert isinstance(llm.make_provider(), OfflineReportProvider)
    assert isinstance(llm.make_provider("offline", base_url="http://x/v1", model=None), OfflineReportProvider)
    p = llm.make_provider("OpenAI", base_url="http://127.0.0.1:9/v1/chat/completions", model=None, on_failure="offline")
    assert isinstance(p, llm.OpenAIReportProvider)
    assert p.base_url == "http://127.0.0.1:9/v1" and p.model == llm.DEFAULT_MODEL and p.on_failure == "offline"
    with pytest.raises(LesionDiffusionError, match="unknown report provider 'gpt'"):
        llm.make_provider("gpt")
    with pytest.raises(LesionDiffusionError, match="on_failure"):
        llm.make_provider("openai", on_failure="ignore")
    with pytest.raises(LesionDiffusionError, match="must start with http"):
        llm.make_provider("openai", base_url="api.openai.com/v1")


def test_hollow_organ_schema_restricts_cavity():
    schema = llm.response_schema("urinary bladder", (60, 50, 40))
    assert schema["properties"]["cavity"]["enum"] == [V.CAVITY_LUMEN, V.CAVITY_WALL]
    assert schema["properties"]["size"]["items"]["maximum"] == 60


@pytest.mark.slow
def test_bundle_run_with_the_openai_provider_writes_the_answer_and_never_the_key(tiny_demo, tmp_path):
    import os
    import subprocess
    import sys

    case = tiny_demo / "cases" / "Liver_cancer"
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--output_dir", str(out),
        "--image", str(case / "image.nii.gz"), "--organ_seg", str(case / "organ_seg.nii.gz"), "--attributes", json.dumps(REQUEST),
        "--report_provider", "openai", "--report_model", "test-model",
    ]  # fmt: skip
    with ChatServer(["good"]) as server:
        env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        run = subprocess.run(
            [*cmd, "--report_base_url", server.url], cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300
        )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(server.requests) == 1 and server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
    report = json.loads((out / "case_000" / "lesion_0.json").read_text())
    attributes = next(iter(report.values()))[2]
    assert attributes["density"].startswith("hypoattenuating fluid-like lesion")  # the server's answer
    assert "approximately 8.0 HU" in attributes["CT value"]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and not any(KEY.encode() in p.read_bytes() for p in written)  # not in the manifest, reports, images
    assert KEY not in run.stdout + run.stderr


# ---- answers checked against the scan ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_scan():
    """The real non-contrast crop of TotalSegmentator's example CT, measured (v2 organ map)."""
    data = Path(__file__).resolve().parents[1] / "data" / "ts_small"
    image = nib.load(str(data / "example_ct_sm.nii.gz"))
    seg = np.asanyarray(nib.load(str(data / "example_seg.nii.gz")).dataobj)
    hu = np.asanyarray(image.dataobj).astype(np.float32)
    return extraction.measure_scan(hu, seg, label_table("v2").id("liver"), "v2", image.header.get_zooms())


def propose_on(server: ChatServer, scan, request=REQUEST, **kwargs) -> dict[str, str]:
    provider = llm.OpenAIReportProvider(**{"base_url": server.url, "model": "test-model", "timeout": 5.0, **kwargs})
    return provider.propose(request, "liver", np.random.default_rng(0), organ_box_size=(120, 100, 90), scan=scan)


def test_the_prompt_holds_the_measured_scan(key, plain_scan):
    with ChatServer(["plain_good"]) as server:
        out = propose_on(server, plain_scan)
    prompt = server.requests[0]["body"]["messages"][1]["content"]
    assert plain_scan.describe() in prompt and f"liver {plain_scan.organ_hu:.0f} HU, non-contrast (aorta" in prompt
    assert "The enhancement status is 'non-contrast CT'" in prompt
    assert out["enhancement status"] == "non-contrast CT," and len(server.requests) == 1


@pytest.mark.parametrize(
    "behaviour, reason",
    [
        ("good", "enhancement status 'enhanced ct' contradicts the scan"),
        ("hypo_not_below", "'hypodense lesion' at 50 HU is not below the liver's"),
    ],
)
def test_an_answer_that_contradicts_the_scan_is_rejected(key, logs, plain_scan, behaviour, reason):
    with ChatServer([behaviour]) as server:
        with pytest.raises(LesionDiffusionError) as err:
            propose_on(server, plain_scan, max_retries=1)
    assert len(server.requests) == 2 and "after 2 attempt(s)" in str(err.value)
    assert "the answer contradicts the scan" in str(err.value) and reason in str(err.value)
    # then retried until an answer agrees
    with ChatServer([behaviour, "plain_good"]) as server:
        out = propose_on(server, plain_scan, max_retries=1)
    assert len(server.requests) == 2 and out["enhancement status"] == "non-contrast CT,"
    # or the offline provider, which measures up to the scan
    with ChatServer([behaviour]) as server:
        out = propose_on(server, plain_scan, max_retries=1, on_failure="offline")
    assert "using the offline provider" in logs.text
    assert out["enhancement status"] == "non-contrast CT," and 0.0 <= parse_ct_value(out["CT value"]) <= 20.0


def test_the_users_own_fields_are_not_held_against_the_answer(key, plain_scan):
    # the user asked for this contradiction: the answer repeating it is accepted (the merge warns about it)
    request = {**REQUEST, "density": "hypodense lesion", "CT value": "50 HU", "enhancement status": "enhanced CT"}
    with ChatServer(["good"]) as server:
        propose_on(server, plain_scan, request=request)
    assert len(server.requests) == 1
