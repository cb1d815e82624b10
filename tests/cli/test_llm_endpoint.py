"""The user's LLM endpoint is honoured: ``--report_base_url``/``--report_model``/``--report_api_key_env`` over
``OPENAI_BASE_URL``/``OPENAI_API_KEY`` over the default; the endpoint used is printed and recorded, the key
never; a fallback to the offline provider is a warning line and recorded as what happened.

A chat-completions server on 127.0.0.1 (stdlib ``http.server`` in a thread) plays each behaviour: a good
answer, a late one (timeout), HTTP 401/429/500, invalid JSON and a schema-invalid answer.
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.reports import providers as llm
from lesiondiffusion_tools.cli import main
from lesiondiffusion_tools.synthesize import gather_requests, read_texts

KEY = "sk-endpoint-SECRET-987654"
SMALL = Path(__file__).resolve().parents[1] / "data" / "ts_small"
SENTENCE = "a 20 mm hypodense cyst in the liver"
ANSWER = {
    "organ type": "liver",
    "lesion type": "cyst",
    "density": "hypoattenuating fluid-like lesion",
    "density variations": "homogeneous",
    "shape": ["round-like"],
    "margin": "well-defined",
    "relationship with adjacent organs": None,
    "specific features": [],
    "cavity": "within the parenchymal organ",
    "enhancement status": None,
    "size in mm": [20],
    "CT value in HU": 8,
}
DEAD = "http://127.0.0.1:9/v1"  # nothing listens there: a request sent to it would fail at once


class Server:
    """Answers every chat-completions request with ``behaviour``; records the path and headers it got."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour, self.requests = behaviour, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "model": body["model"]}
                )
                status = {"http401": 401, "http429": 429, "http500": 500}.get(server.behaviour)
                if status:
                    self.send(status, {"error": {"message": "no", "type": "error"}})
                    return
                if server.behaviour == "slow":
                    time.sleep(2.0)
                content = {
                    "good": json.dumps(ANSWER),
                    "slow": json.dumps(ANSWER),
                    "invalid_json": '{"organ type": "liv',
                    "schema_invalid": json.dumps({**ANSWER, "density": "purple"}),
                }[server.behaviour]
                self.send(
                    200,
                    {
                        "id": "c",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        ],
                    },
                )

            def send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return monkeypatch


def test_precedence_option_then_environment_then_default(env):
    assert llm.endpoint_settings()["base_url"] == llm.DEFAULT_BASE_URL
    env.setenv("OPENAI_BASE_URL", "http://10.0.0.5:8000/v1/")
    used = llm.endpoint_settings()
    assert used == {
        "base_url": "http://10.0.0.5:8000/v1",
        "base_url_from": "OPENAI_BASE_URL",
        "model": llm.DEFAULT_MODEL,
        "api_key_env": "OPENAI_API_KEY",
    }
    used = llm.endpoint_settings("http://127.0.0.1:1234/v1/chat/completions", "local-model", "MY_KEY")
    assert used == {
        "base_url": "http://127.0.0.1:1234/v1",
        "base_url_from": "option",
        "model": "local-model",
        "api_key_env": "MY_KEY",
    }
    with pytest.raises(LesionDiffusionError, match="must name an environment variable"):
        llm.endpoint_settings(api_key_env="sk-looks-like-a-key!")
    assert KEY not in json.dumps(llm.make_provider("openai").record())


def test_the_environments_base_url_is_where_the_request_goes(env):
    with Server("good") as server:
        env.setenv("OPENAI_BASE_URL", server.url)
        reading = llm.read_text(llm.make_provider("openai", max_retries=0), SENTENCE)
    assert server.requests == [{"path": "/v1/chat/completions", "auth": f"Bearer {KEY}", "model": llm.DEFAULT_MODEL}]
    assert reading.attributes["organ type"] == "liver"


@pytest.mark.parametrize(
    "behaviour, reason",
    [
        ("slow", "no answer within 0.5 s"),
        ("http401", "HTTP 401"),
        ("http429", "HTTP 429"),
        ("http500", "HTTP 500"),
        ("invalid_json", "not JSON"),
        ("schema_invalid", "does not follow the schema"),
    ],
)
def test_failures_fall_back_offline_recorded_or_are_one_error(env, tmp_path, behaviour, reason, caplog):
    cases = gather_requests(image=str(tmp_path / "ct.nii.gz"), text=SENTENCE)
    with Server(behaviour) as server:
        settings = {"report_base_url": server.url, "report_timeout": 0.5, "report_max_retries": 0}
        read = read_texts(cases, "openai", {**settings, "report_on_failure": "offline"})
        assert read[0].reading.reader == "offline"
        recorded = read[0].provenance()["warnings"]
        assert (
            len(recorded) == 1 and reason in recorded[0] and server.url in recorded[0] and "read offline" in recorded[0]
        )
        with pytest.raises(LesionDiffusionError) as err:
            read_texts(cases, "openai", {**settings, "report_on_failure": "error"})
    assert len(server.requests) == 2 and "\n" not in str(err.value) and reason in str(err.value)
    assert KEY not in caplog.text and KEY not in str(err.value) and KEY not in json.dumps(recorded)


def test_the_option_beats_the_environment_on_the_command_line(env, tmp_path, capsys):
    """``--report_base_url`` wins over OPENAI_BASE_URL; the endpoint is printed; a 401 is one error line."""
    env.setenv("OPENAI_BASE_URL", DEAD)
    with Server("http401") as server:
        with pytest.raises(SystemExit) as stop:
            main(
                [
                    "synthesize",
                    "--image",
                    str(SMALL / "example_ct_sm.nii.gz"),
                    "--organ_seg",
                    str(SMALL / "example_seg.nii.gz"),
                    "--text",
                    SENTENCE,
                    "--report_provider",
                    "openai",
                    "--report_base_url",
                    server.url,
                    "--report_model",
                    "m1",
                    "--bundle_overrides",
                    '{"preprocess": {"report_max_retries": 0}}',
                    "--out",
                    str(tmp_path / "out"),
                ]
            )
    out, err = capsys.readouterr()
    assert stop.value.code == 1 and server.requests and server.requests[0]["model"] == "m1"
    assert f"report provider: openai at {server.url} (from option), model m1, key from $OPENAI_API_KEY" in out
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: text reader openai ({server.url}, model m1) failed after 1 attempt(s): HTTP 401 from the server"
    ]
    assert KEY not in out + err and list(tmp_path.iterdir()) == []


def test_a_run_records_the_endpoint_and_the_fallback_never_the_key(env, tmp_path, capsys, caplog):
    """A whole run against a failing server with ``report_on_failure: offline``: the case is written, its
    provenance names the endpoint and both fallbacks (sentence and report); the key is in no file."""
    ct, seg = nib.load(SMALL / "example_ct_sm.nii.gz"), nib.load(SMALL / "example_seg.nii.gz")
    labels = np.asarray(seg.dataobj)
    centre = np.rint(ndimage.center_of_mass(labels == 5)).astype(int)
    box = tuple(slice(max(c - h, 0), c + h) for c, h in zip(centre, (14, 14, 7), strict=True))
    affine = ct.affine.copy()
    affine[:3, 3] = ct.affine[:3, :3] @ np.array([b.start for b in box]) + ct.affine[:3, 3]
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj)[box], affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels[box].astype(np.uint8), affine), tmp_path / "seg.nii.gz")
    out = tmp_path / "out"
    overrides = {"preprocess": {"report_on_failure": "offline", "report_max_retries": 0}}
    with Server("http500") as server:
        env.setenv("OPENAI_BASE_URL", server.url)
        main(
            [
                "synthesize",
                "--image",
                str(tmp_path / "ct.nii.gz"),
                "--organ_seg",
                str(tmp_path / "seg.nii.gz"),
                "--text",
                SENTENCE,
                "--report_provider",
                "openai",
                "--bundle_overrides",
                json.dumps(overrides),
                "--steps",
                "1",
                "--verbose",
                "false",
                "--out",
                str(out),
            ]
        )
    printed = capsys.readouterr()
    assert len(server.requests) == 2  # the sentence, then the report proposal: one attempt each
    assert f"report provider: openai at {server.url} (from OPENAI_BASE_URL)" in printed.out
    provenance = json.loads((out / "ct" / "provenance.json").read_text())
    assert provenance["parameters"]["report_endpoint"]["base_url"] == server.url
    record = provenance["report_provider"]
    assert record["base_url"] == server.url and record["base_url_from"] == "OPENAI_BASE_URL"
    assert (
        len(record["fallbacks"]) == 1
        and "HTTP 500" in record["fallbacks"][0]
        and "proposed offline" in record["fallbacks"][0]
    )
    assert any("read offline" in w for w in provenance["request"]["warnings"])
    assert any(r.levelname == "WARNING" and "report proposed offline" in r.getMessage() for r in caplog.records)
    assert provenance["request"]["text_reading"]["reader"] == "offline"
    for root, _, files in os.walk(out):
        for name in files:
            assert KEY.encode() not in (Path(root) / name).read_bytes(), name
    assert KEY not in printed.out + printed.err
