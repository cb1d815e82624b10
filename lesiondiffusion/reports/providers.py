"""Report providers: ``offline`` (default) and ``openai`` (any compatible endpoint), behind :class:`ReportProvider`.

The ``openai`` provider asks a chat-completions endpoint for the missing report fields with a JSON
schema built from the vocabulary (``response_format`` of type ``json_schema``), validates the answer
against the same schema and against what was measured in the scan (the organ's HU, the contrast phase:
:func:`lesiondiffusion.attributes.report_conflicts`), and retries a bounded number of times. When every attempt fails it raises one
clear error or falls back to the offline provider (``on_failure``). The API key is read from the
environment (``OPENAI_API_KEY`` by default) and never written to logs, errors or outputs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import jsonschema
import numpy as np

from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import (
    ENHANCED,
    ISO_HU,
    LESION_TYPE,
    NON_CONTRAST,
    ORGAN_TYPE,
    ScanContext,
    allowed_cavities,
    density_reference_hu,
    margin_text,
    report_conflicts,
)
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.extras import require as require_extra
from lesiondiffusion.report import format_ct_value, format_size, to_report_axes
from lesiondiffusion.reports.generation import OfflineReportProvider
from lesiondiffusion.text import (
    ANSWER_INSTRUCTIONS,
    TextError,
    TextReading,
    answer_schema,
    read_description,
    reading_from_answer,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = "OPENAI_BASE_URL"  # the openai client's own variable: honoured, never overridden by the default
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_MODEL = "gpt-4o-mini"
ON_FAILURE = ("error", "offline")
ENDPOINT_SUFFIX = "/chat/completions"  # the client appends it; a base URL that already ends in it is trimmed
HU_RANGE = (-1024, 3071)
MULTI_FIELDS = (V.SHAPE, V.SPECIFIC)  # fields that may hold several classes
SYSTEM_PROMPT = (
    "You are a radiologist writing the structured report of one lesion seen on a CT scan. "
    "Answer with one JSON object that follows the given schema exactly; use only the listed values."
)


@runtime_checkable
class ReportProvider(Protocol):
    """What the preprocess stage asks of a report provider: every report field for one request."""

    name: str

    def propose(
        self, request: Mapping[str, str], organ_name: str, rng: np.random.Generator, **context: Any
    ) -> dict[str, str]:
        """Every report field (the request's own values kept) as the original's strings; ``context`` holds the
        keywords ``organ_box_size``, ``organ_reference_hu`` and ``scan`` (:class:`ScanContext`)."""
        ...


def response_schema(organ_name: str, organ_box_size: Sequence[int] | None = None) -> dict[str, Any]:
    """The JSON schema of an answer: one property per report field, values from the vocabulary.

    Categorical fields are enums of the vocabulary's canonical classes (lists for shape and specific
    features), the cavity is restricted to the two classes the organ admits, the size is three voxel
    counts (array axes x, y, z; at most the organ's box when given) and the CT value a number of HU.
    """
    props: dict[str, Any] = {
        V.ENHANCEMENT: {"type": "string", "enum": [ENHANCED.rstrip(","), NON_CONTRAST.rstrip(",")]},
        V.CAVITY: {"type": "string", "enum": list(allowed_cavities(organ_name))},
        V.SIZE: {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": int(max(organ_box_size)) if organ_box_size else 512},
            "minItems": 3,
            "maxItems": 3,
        },
        V.CT_VALUE: {"type": "number", "minimum": HU_RANGE[0], "maximum": HU_RANGE[1]},
    }
    for name in (V.SHAPE, V.DENSITY, V.DENSITY_VARIATIONS, V.SURFACE, V.RELATIONSHIP, V.SPECIFIC):
        enum = list(V.classes(name))
        if name in MULTI_FIELDS:
            props[name] = {
                "type": "array",
                "items": {"type": "string", "enum": enum},
                "minItems": 0 if name == V.SPECIFIC else 1,
                "maxItems": 3,
            }
        else:
            props[name] = {"type": "string", "enum": enum}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def answer_to_attributes(answer: Mapping[str, Any]) -> dict[str, str]:
    """A schema-valid answer as report strings in the original's style (size in the report's axis order)."""
    out: dict[str, str] = {}
    for name, value in answer.items():
        if name == V.SIZE:
            out[name] = format_size(to_report_axes([int(v) for v in value]))
        elif name == V.CT_VALUE:
            out[name] = format_ct_value(float(value))
        elif name == V.ENHANCEMENT:
            out[name] = ENHANCED if value.lower().startswith("enhanced") else NON_CONTRAST
        elif name == V.CAVITY:
            out[name] = str(value)
        elif isinstance(value, list):
            out[name] = V.format_classes([str(v) for v in value])
        else:
            out[name] = V.format_classes([str(value)])
    return out


def _strip_fences(text: str) -> str:
    """Some servers wrap JSON in markdown code fences despite the schema."""
    m = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, flags=re.S)
    return m.group(1) if m else text


class ProviderFailure(Exception):
    """One failed attempt (transport, HTTP status, malformed or invalid answer); message is key-free."""


class OpenAIReportProvider:
    """Report proposals from an OpenAI-compatible chat-completions endpoint.

    ``base_url`` is the API root (``https://api.openai.com/v1``, ``http://localhost:8000/v1``); a URL
    that already ends in ``/chat/completions`` is trimmed so the path is never doubled. The key comes from
    the environment variable ``api_key_env``. ``max_retries`` extra attempts follow a failed one (each
    with ``timeout`` seconds); then ``on_failure="error"`` raises a :class:`LesionDiffusionError` and
    ``on_failure="offline"`` uses :class:`OfflineReportProvider`.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        on_failure: str = "error",
        temperature: float = 0.2,
    ) -> None:
        if on_failure not in ON_FAILURE:
            raise LesionDiffusionError(f"report on_failure must be one of {', '.join(ON_FAILURE)}, not {on_failure!r}")
        if int(max_retries) < 0 or float(timeout) <= 0:
            raise LesionDiffusionError("report provider: max_retries must be >= 0 and timeout > 0")
        endpoint = endpoint_settings(base_url, model, api_key_env)
        self.base_url = endpoint["base_url"]
        self.base_url_from = endpoint["base_url_from"]
        self.model = endpoint["model"]
        self.api_key_env = endpoint["api_key_env"]
        self.fallbacks: list[str] = []  # what fell back to the offline provider, and why (recorded in provenance)
        logger.info("report provider openai: %s (%s), model %s, key from $%s", self.base_url, self.base_url_from, self.model,
                    self.api_key_env)  # fmt: skip
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.on_failure = on_failure
        self.temperature = float(temperature)
        self.offline = OfflineReportProvider()

    def __repr__(self) -> str:  # never the key
        return f"OpenAIReportProvider(base_url={self.base_url!r}, model={self.model!r}, on_failure={self.on_failure!r})"

    def record(self) -> dict[str, Any]:
        """What provenance keeps of this provider: the endpoint used and where it came from, and any fallback (no key)."""
        return {
            "provider": self.name, "base_url": self.base_url, "base_url_from": self.base_url_from, "model": self.model,
            "api_key_env": self.api_key_env, "fallbacks": list(self.fallbacks),
        }  # fmt: skip

    def _key(self) -> str:
        key = os.environ.get(self.api_key_env, "")
        if not key.strip():
            raise ProviderFailure(f"the environment variable {self.api_key_env} is not set (it holds the API key)")
        return key.strip()

    def messages(
        self,
        request: Mapping[str, str],
        organ_name: str,
        organ_box_size: Sequence[int] | None,
        reference_hu: float,
        scan: ScanContext | None = None,
    ) -> list[dict[str, str]]:
        """The chat messages of one request (no key, nothing but the request, the organ and what was measured)."""
        given = {
            k: v for k, v in request.items() if k not in (ORGAN_TYPE, LESION_TYPE) and isinstance(v, str) and v.strip()
        }
        box = (
            f" Its bounding box is {list(map(int, organ_box_size))} voxels of 1 mm (x, y, z)." if organ_box_size else ""
        )
        user = (
            f"Write the report of a {request.get(LESION_TYPE, 'lesion')} in the {organ_name}.{box} "
            f"The {organ_name} parenchyma measures about {reference_hu:.0f} HU on this scan; give the lesion's mean "
            f"CT value in HU consistent with its density class. The lesion size (x, y, z, in voxels) must not exceed "
            f"the organ's box. The margin class for this organ is '{margin_text(organ_name, True)}' or "
            f"'{margin_text(organ_name, False)}'. Keep these attributes as given: {json.dumps(given)}."
            f"{scan_facts(scan, reference_hu)}"
        )
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def ask(
        self, messages: list[dict[str, str]], schema: dict[str, Any], seed: int, accept: Callable[[Any], T], what: str
    ) -> tuple[T | None, str]:
        """Up to ``max_retries + 1`` schema-checked attempts; ``accept`` turns an answer into the result or
        raises :class:`ProviderFailure` (the attempt fails). Returns ``(result, "")`` or ``(None, one-line reason)``;
        the key never appears in a message."""
        openai = require_extra("llm", "the openai report provider")  # an extra: one line when it is missing

        attempts = self.max_retries + 1
        reason = key = ""
        try:
            key = self._key()
            client = openai.OpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=0)
            for attempt in range(1, attempts + 1):
                try:
                    result = accept(self._attempt(client, messages, schema, seed))
                    logger.info("%s %s (model %s): answer on attempt %d", what, self.base_url, self.model, attempt)
                    return result, ""
                except ProviderFailure as e:
                    reason = _redact(str(e), key)
                    logger.warning("%s %s: attempt %d of %d failed: %s", what, self.base_url, attempt, attempts, reason)
            return (
                None,
                f"{what} openai ({self.base_url}, model {self.model}) failed after {attempts} attempt(s): {reason}",
            )
        except ProviderFailure as e:  # no key: no attempt was made
            return None, f"{what} openai ({self.base_url}): {_redact(str(e), key)}"

    def _attempt(
        self, client: Any, messages: list[dict[str, str]], schema: dict[str, Any], seed: int
    ) -> dict[str, Any]:
        import openai

        try:
            response = client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=self.temperature,
                seed=seed,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "lesion_report", "strict": True, "schema": schema},
                },
            )
        except openai.APITimeoutError:
            raise ProviderFailure(f"no answer within {self.timeout:g} s") from None
        except openai.APIStatusError as e:
            raise ProviderFailure(f"HTTP {e.status_code} from the server") from None
        except openai.APIConnectionError as e:
            raise ProviderFailure(f"cannot connect ({type(e.__cause__ or e).__name__})") from None
        except openai.APIError as e:
            raise ProviderFailure(f"API error ({type(e).__name__})") from None
        try:
            content = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise ProviderFailure("the answer has no message content") from None
        if not isinstance(content, str) or not content.strip():
            raise ProviderFailure("the answer is empty")
        try:
            answer = json.loads(_strip_fences(content))
        except json.JSONDecodeError as e:
            raise ProviderFailure(f"the answer is not JSON ({e.msg} at character {e.pos})") from None
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(answer))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
            raise ProviderFailure(f"the answer does not follow the schema at {where}: {error.message[:200]}")
        return answer

    def propose(
        self,
        request: Mapping[str, str],
        organ_name: str,
        rng: np.random.Generator,
        *,
        organ_box_size: Sequence[int] | None = None,
        organ_reference_hu: float | None = None,
        scan: ScanContext | None = None,
    ) -> dict[str, str]:
        """Every report field, as :meth:`OfflineReportProvider.propose`, asked of the endpoint.

        The answer must agree with the scan (``scan``, else ``organ_reference_hu``): a density class
        its CT value does not have against the organ's HU, or an enhancement status the scan's contrast
        contradicts, fails the attempt like an answer outside the schema.
        """
        reference = scan.reference_hu if scan is not None else density_reference_hu(organ_name, organ_reference_hu)
        messages = self.messages(request, organ_name, organ_box_size, reference, scan)

        def accept(raw: Any) -> dict[str, str]:
            answer = answer_to_attributes(raw)
            _check_against_scan(answer, request, organ_name, scan, reference)
            return answer

        answer, message = self.ask(
            messages,
            response_schema(organ_name, organ_box_size),
            int(rng.integers(0, 2**31 - 1)),
            accept,
            "report provider",
        )
        if answer is not None:
            return answer
        if self.on_failure == "offline":
            logger.warning("%s; using the offline provider", message)
            self.fallbacks.append(f"{message}; report proposed offline")
            return self.offline.propose(
                request,
                organ_name,
                rng,
                organ_box_size=organ_box_size,
                organ_reference_hu=organ_reference_hu,
                scan=scan,
            )
        raise LesionDiffusionError(message)


def scan_facts(scan: ScanContext | None, reference_hu: float) -> str:
    """The prompt's sentences on what was measured in the scan and what the answer must agree with."""
    rule = (
        f" A hypodense or fluid-like lesion's CT value lies more than {ISO_HU:g} HU below {reference_hu:.0f} HU, an "
        f"isodense one within {ISO_HU:g} HU of it, a hyperdense one more than {ISO_HU:g} HU above it."
    )
    if scan is None:
        return rule
    status = f" The enhancement status is '{scan.enhancement.rstrip(',')}'." if scan.enhancement else ""
    return f" Measured on this scan: {scan.describe()}.{status}{rule}"


def _check_against_scan(
    answer: Mapping[str, str],
    request: Mapping[str, str],
    organ_name: str,
    scan: ScanContext | None,
    reference_hu: float,
) -> None:
    """Fail the attempt when the answer, with the user's fields in place, contradicts the scan."""
    given = {k: v for k, v in request.items() if k in V.REPORT_FIELDS and isinstance(v, str) and v.strip()}
    problems = report_conflicts({**answer, **given}, organ_name, scan, reference_hu=reference_hu, fixed=tuple(given))
    if problems:
        raise ProviderFailure(f"the answer contradicts the scan: {'; '.join(problems)}")


def read_text(provider: OpenAIReportProvider, text: str, seed: int = 0, require_organ: bool = True) -> TextReading:
    """The lesion a sentence describes, read by the endpoint into :func:`lesiondiffusion.text.answer_schema`.

    The same client, key handling, schema validation and bounded retries as the report proposals; an
    answer that cannot be a request (a cavity its organ does not admit) fails its attempt too. When every
    attempt fails, ``on_failure="error"`` raises and ``"offline"`` reads the sentence offline
    (:func:`lesiondiffusion.text.read_description`, ``require_organ`` as there).
    """
    messages = [{"role": "system", "content": ANSWER_INSTRUCTIONS}, {"role": "user", "content": str(text)}]

    def accept(raw: Any) -> TextReading:
        try:
            return reading_from_answer(text, raw, f"openai ({provider.model})")
        except TextError as e:
            raise ProviderFailure(f"the answer is not a request: {e}") from None

    reading, message = provider.ask(messages, answer_schema(), seed, accept, "text reader")
    if reading is not None:
        return reading
    if provider.on_failure == "offline":
        logger.warning("%s; reading the sentence offline", message)
        provider.fallbacks.append(f"{message}; sentence read offline")
        return read_description(text, require_organ=require_organ)
    raise LesionDiffusionError(message)


def _redact(text: str, key: str) -> str:
    """``text`` with the key (if any) replaced, should a server ever echo it."""
    return text.replace(key, "***") if key else text


def endpoint_settings(
    base_url: str | None = None, model: str | None = None, api_key_env: str | None = None
) -> dict[str, str]:
    """The endpoint to use: each setting given (option or config), else the environment (``OPENAI_BASE_URL``;
    the key from ``OPENAI_API_KEY``), else the default; ``base_url_from`` says which. Never holds the key."""
    given = None if base_url in (None, "") else str(base_url)
    env = os.environ.get(BASE_URL_ENV, "").strip()
    url, origin = (given, "option") if given else ((env, BASE_URL_ENV) if env else (DEFAULT_BASE_URL, "default"))
    key_env = str(api_key_env).strip() if api_key_env not in (None, "") else DEFAULT_KEY_ENV
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
        raise LesionDiffusionError(
            f"report api_key_env {key_env!r} must name an environment variable (e.g. OPENAI_API_KEY)"
        )
    return {
        "base_url": normalise_base_url(url),
        "base_url_from": origin,
        "model": str(model or DEFAULT_MODEL),
        "api_key_env": key_env,
    }


def normalise_base_url(base_url: str) -> str:
    """The API root: trailing slashes and a trailing ``/chat/completions`` removed."""
    url = str(base_url).strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise LesionDiffusionError(f"report base URL {base_url!r} must start with http:// or https://")
    while url.endswith(ENDPOINT_SUFFIX):
        url = url[: -len(ENDPOINT_SUFFIX)].rstrip("/")
    return url


def make_provider(name: str = "offline", **kwargs: Any) -> OfflineReportProvider | OpenAIReportProvider:
    """The report provider ``name`` (``offline`` or ``openai``); ``None`` values mean the defaults.

    Keyword arguments configure the ``openai`` provider (base_url, model, api_key_env, timeout,
    max_retries, on_failure, temperature); the offline provider needs none and ignores them.
    """
    choice = str(name).strip().lower()
    if choice == "offline":
        return OfflineReportProvider()
    if choice == "openai":
        return OpenAIReportProvider(**{k: v for k, v in kwargs.items() if v is not None})
    raise LesionDiffusionError(f"unknown report provider {name!r}; use 'offline' or 'openai'")
