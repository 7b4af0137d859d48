"""Local stand-in for the Anthropic Messages API, served with aiohttp.web.

This module owns the simulator: validation of ``POST /v1/messages``, deterministic
answers (JSON and Server-Sent Events), per-key sliding-window rate limits, fault
injection (random, a scripted queue and in-prompt directives), the counters, and the
``/_sim/`` control routes. It never calls the real API.

Each ``POST /v1/messages`` request goes through these steps, in order:

1. authentication: ``x-api-key``, else ``Authorization: Bearer <key>`` -> 401;
2. the ``anthropic-version`` header must be a ``YYYY-MM-DD`` date -> 400;
3. body validation, including the ``[[sim:...]]`` directives -> 400;
4. the fault plan: the next scripted fault if one is queued (it replaces the
   prompt's directives and the random fault for that one request), else the
   prompt's directives, else a random fault drawn with ``fail_rate``;
5. latency: ``latency_ms`` plus jitter plus the plan's ``latency_ms``;
6. the plan's ``hang`` or error status;
7. rate limits per key (``rpm``, ``tpm``) -> 429; only admitted requests use budget;
8. the answer, cut short when the plan says ``cut``.

Directives sit anywhere in the text of the last user message, as one or more
``[[sim:item,item,...]]`` groups, each item ``name=value`` or a bare flag:
``status=<200|400-599>``, ``latency_ms=<int>``, ``retry_after_s=<float>``,
``fail_times=<int>``, ``cut``, ``hang``, ``empty``, ``max_tokens``,
``surrogate`` (a lone UTF-16 surrogate in the answer's text, which no UTF-8
can carry: a broken answer for the node's response checks). An unknown name
or a bad value is a 400. ``fail_times=N`` applies the plan's faults (``status``,
default 529, or ``cut``/``hang``) to the first N requests with that exact text and
lets later ones succeed.

Counters (``GET /_sim/stats`` and ``Simulator.stats``): ``requests`` counts every
``POST /v1/messages``; ``by_status`` counts outcomes by key, the HTTP status as a
string, or ``"cut"`` (connection closed mid-body), ``"hang"`` (no answer until the
client left or the simulator stopped), ``"dropped"`` (client left, or the simulator
stopped, before an answer); ``billed_by_prompt`` counts the requests that got past
injected faults and rate limits, the ones the real API would bill, by the same key
as ``by_prompt``; ``by_prompt`` counts requests that passed validation,
keyed by ``prompt_key`` of the last user message text; ``tokens_by_prompt``
sums the ``[input, output]`` tokens of the billed answers by the same key.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import math
import random
import re
import secrets
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from hashlib import sha256
from types import MappingProxyType, TracebackType
from typing import Any, Self

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)

ENV_API_KEYS = "MESH_SIM_API_KEYS"
"""Environment variable holding the accepted keys, comma-separated."""

ERROR_TYPES: Mapping[int, str] = MappingProxyType(
    {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        408: "timeout_error",
        409: "conflict_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        502: "api_error",
        503: "api_error",
        504: "api_error",
        529: "overloaded_error",
    }
)

_WINDOW_S = 60.0
_CHARS_PER_TOKEN = 4
_REPLY_PREFIX = "Simulated reply to: "
_ECHO_CHARS = 60
_STREAM_CHUNK_CHARS = 8
_RANDOM_FAULT_STATUSES = (429, 500, 529)
_DEFAULT_FAIL_STATUS = 529
# The real API accepts bodies up to 32 MB; aiohttp's default is 1 MiB.
_MAX_BODY_BYTES = 32 * 1024 * 1024
_DIRECTIVE_RE = re.compile(r"\[\[sim:([^\]]*)\]\]")
_VERSION_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_FLAG_FIELDS = frozenset({"cut", "hang", "empty", "max_tokens", "surrogate"})
_FAULT_MESSAGES: Mapping[int, str] = MappingProxyType(
    {
        429: "Number of requests has exceeded your rate limit (simulated)",
        500: "Internal server error (simulated)",
        529: "Overloaded (simulated)",
    }
)


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Settings of one simulator instance.

    Attributes:
        host: Address to bind; keep it on loopback.
        port: Port to bind; 0 picks a free one (read it from ``Simulator.port``).
        latency_ms: Delay added before each answer that passes validation.
        latency_jitter_ms: Uniform extra delay, 0..jitter, on top of latency_ms.
        fail_rate: Share of requests answered with a random 429, 500 or 529.
        rpm: Requests per minute per API key; None is unlimited.
        tpm: Input plus output tokens per minute per API key; None is unlimited.
        api_keys: Accepted keys; None accepts any non-empty key.
        tls_cert: A PEM certificate chain; with ``tls_key``, serves HTTPS, so
            that it can stand in for the API behind a TLS-only egress proxy.
        tls_key: The certificate's PEM private key.
    """

    host: str = "127.0.0.1"
    port: int = 8787
    latency_ms: int = 0
    latency_jitter_ms: int = 0
    fail_rate: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    api_keys: frozenset[str] | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        """Rejects values the simulator cannot honour.

        Raises:
            ValueError: A field is out of range.
        """
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
        if self.latency_ms < 0 or self.latency_jitter_ms < 0:
            raise ValueError("latency_ms and latency_jitter_ms must be >= 0")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be in 0..1")
        if any(limit is not None and limit < 1 for limit in (self.rpm, self.tpm)):
            raise ValueError("rpm and tpm must be >= 1 or None")
        if self.api_keys is not None and not all(self.api_keys):
            raise ValueError("api_keys must not contain empty keys")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """What to inject into one request, from a directive or a scripted fault.

    Attributes:
        status: Answer with this status and its error type; 200 or None = no error.
        retry_after_s: Sent as ``retry-after`` (ceil, >= 1) and ``retry-after-ms``.
        latency_ms: Extra delay before the answer.
        fail_times: Apply the faults to only the first N requests with this text.
        cut: Start the answer, then close the connection mid-body.
        hang: Never answer; wait until the client leaves or the simulator stops.
        empty: Succeed with an empty content list.
        max_tokens: Succeed with stop_reason ``max_tokens``.
        surrogate: Succeed with a lone surrogate (``\\ud800``) in the text.
    """

    status: int | None = None
    retry_after_s: float | None = None
    latency_ms: int = 0
    fail_times: int | None = None
    cut: bool = False
    hang: bool = False
    empty: bool = False
    max_tokens: bool = False
    surrogate: bool = False

    @classmethod
    def from_mapping(cls, entry: Mapping[str, object]) -> FaultSpec:
        """Builds a scripted fault from its JSON form.

        The form is ``{"status": 529, "retry_after_s": 1, "latency_ms": 0,
        "kind": "cut" | "hang" | "empty" | "max_tokens" | "surrogate"}``, every
        key optional.

        Args:
            entry: The JSON object of one fault.

        Returns:
            The fault.

        Raises:
            ValueError: Unknown key or bad value; the message starts with the key.
        """
        changes: dict[str, Any] = {}
        for name, value in entry.items():
            if name == "kind":
                changes[_kind_value(value)] = True
            elif name in _CONVERTERS and name != "fail_times":
                changes[name] = _CONVERTERS[name](value)
            else:
                raise ValueError(f"{name}: unknown field")
        return dataclasses.replace(cls(), **changes)

    @property
    def fails(self) -> bool:
        """Whether the plan keeps the request from a normal answer."""
        return self.cut or self.hang or self.status not in (None, 200)


@dataclass(frozen=True, slots=True)
class SimStats:
    """A snapshot of the simulator's counters (shape of ``GET /_sim/stats``)."""

    requests: int
    by_status: Mapping[str, int]
    by_prompt: Mapping[str, int]
    billed_by_prompt: Mapping[str, int]
    tokens_by_prompt: Mapping[str, tuple[int, int]]

    def as_dict(self) -> dict[str, object]:
        """Returns the snapshot as the JSON object the stats route serves."""
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "by_prompt": dict(self.by_prompt),
            "billed_by_prompt": dict(self.billed_by_prompt),
            "tokens_by_prompt": {
                key: list(tokens) for key, tokens in self.tokens_by_prompt.items()
            },
        }


def prompt_key(text: str) -> str:
    """Returns the ``by_prompt`` key of a last user message text (sha256 hex)."""
    return sha256(text.encode("utf-8")).hexdigest()


def keys_from_env(environ: Mapping[str, str]) -> frozenset[str] | None:
    """Reads the accepted API keys from ``MESH_SIM_API_KEYS``.

    Args:
        environ: The environment, usually ``os.environ``.

    Returns:
        The comma-separated, stripped, non-empty keys; None (any key) when the
        variable is unset or holds no key.
    """
    raw = environ.get(ENV_API_KEYS, "")
    keys = frozenset(part.strip() for part in raw.split(",") if part.strip())
    return keys or None


def error_type_for(status: int) -> str:
    """Returns the API error type the real API uses for an HTTP status."""
    known = ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def parse_directives(text: str) -> FaultSpec:
    """Reads the ``[[sim:...]]`` directives of a message text.

    Args:
        text: The text of the last user message.

    Returns:
        The combined directives; a default FaultSpec when there are none.

    Raises:
        ValueError: Unknown directive or bad value.
    """
    changes: dict[str, Any] = {}
    for group in _DIRECTIVE_RE.findall(text):
        for item in group.split(","):
            name, has_value, value = item.strip().partition("=")
            if name:
                changes[name.strip()] = _directive_value(
                    name.strip(), value.strip() if has_value else None
                )
    return dataclasses.replace(FaultSpec(), **changes)


def _directive_value(name: str, value: str | None) -> object:
    """Converts one directive item to its FaultSpec field value."""
    if name in _FLAG_FIELDS:
        if value is not None:
            raise ValueError(f"sim directive {name!r} takes no value")
        return True
    converter = _CONVERTERS.get(name)
    if converter is None:
        raise ValueError(f"unknown sim directive {name!r}")
    if value is None:
        raise ValueError(f"sim directive {name!r} needs a value")
    return converter(value)


def _int_value(name: str, value: object, low: int, high: int) -> int:
    """Reads an integer from JSON or directive text, within bounds."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{name}: expected an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer")
    if not low <= value <= high:
        raise ValueError(f"{name}: expected a value in {low}..{high}")
    return value


def _float_value(name: str, value: object, high: float) -> float:
    """Reads a non-negative finite number from JSON or directive text."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected a number")
    if not 0 <= value <= high:
        raise ValueError(f"{name}: expected a value in 0..{high:g}")
    return float(value)


def _status_value(value: object) -> int:
    """Reads an injectable status: 200 (no error) or 400..599."""
    status = _int_value("status", value, 200, 599)
    if 200 < status < 400:
        raise ValueError("status: expected 200 or a value in 400..599")
    return status


def _kind_value(value: object) -> str:
    """Reads the ``kind`` of a scripted fault."""
    if not isinstance(value, str) or value not in _FLAG_FIELDS:
        raise ValueError(
            "kind: expected one of cut, hang, empty, max_tokens, surrogate"
        )
    return value


_CONVERTERS: Mapping[str, Callable[[object], Any]] = MappingProxyType(
    {
        "status": _status_value,
        "latency_ms": lambda value: _int_value("latency_ms", value, 0, 3_600_000),
        "retry_after_s": lambda value: _float_value("retry_after_s", value, 86_400.0),
        "fail_times": lambda value: _int_value("fail_times", value, 0, 1_000_000),
    }
)


class _ApiError(Exception):
    """An error answer in the real API's envelope."""

    def __init__(
        self, status: int, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """Keeps the status, the message and any extra headers of the answer."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def _invalid(message: str) -> _ApiError:
    """Returns a 400 invalid_request_error whose message names the field."""
    return _ApiError(400, message)


def _new_id(prefix: str) -> str:
    """Returns a fresh id such as ``req_sim_<hex>``."""
    return prefix + secrets.token_hex(12)


def _error_response(
    status: int,
    message: str,
    request_id: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Builds an error answer in the real API's envelope."""
    body = {
        "type": "error",
        "error": {"type": error_type_for(status), "message": message},
        "request_id": request_id,
    }
    all_headers = {**(headers or {}), "request-id": request_id}
    return web.json_response(body, status=status, headers=all_headers)


def _retry_after_headers(wait_s: float) -> dict[str, str]:
    """Returns ``retry-after`` (whole seconds, >= 1) and ``retry-after-ms``."""
    return {
        "retry-after": str(max(1, math.ceil(wait_s))),
        "retry-after-ms": str(math.ceil(wait_s * 1000)),
    }


def _rfc3339_in(offset_s: float) -> str:
    """Returns the UTC time ``offset_s`` from now, as RFC 3339 with seconds."""
    moment = datetime.fromtimestamp(math.ceil(time.time() + offset_s), tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _tokens(chars: int) -> int:
    """Estimates tokens from characters, as the simulator's tokenizer."""
    return math.ceil(chars / _CHARS_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class _Parsed:
    """The parts of a valid request body the simulator uses."""

    model: str
    max_tokens: int
    stream: bool
    prompt_text: str
    directives: FaultSpec
    input_tokens: int


@dataclass(frozen=True, slots=True)
class _Reply:
    """The answer's content; text None means an empty content list."""

    text: str | None
    output_tokens: int
    stop_reason: str


@dataclass(slots=True)
class _Exchange:
    """One ``/v1/messages`` request in flight."""

    request_id: str
    outcome: str | None = None


def _check_version(request: web.Request) -> None:
    """Requires an ``anthropic-version`` header that is a ``YYYY-MM-DD`` date."""
    version = request.headers.get("anthropic-version", "").strip()
    try:
        valid = bool(_VERSION_RE.fullmatch(version)) and bool(
            date.fromisoformat(version)
        )
    except ValueError:
        valid = False
    if not valid:
        raise _invalid(
            "anthropic-version: header is required and must be a date (YYYY-MM-DD)"
        )


async def _read_json(request: web.Request) -> object:
    """Reads the request body as JSON."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _ApiError(413, "Request exceeds the maximum allowed size") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _invalid("body: could not parse the request body as JSON") from None


def _parse_body(body: object) -> _Parsed:
    """Validates a Messages API body like the real API does.

    Raises:
        _ApiError: 400 whose message names the offending field.
    """
    if not isinstance(body, dict):
        raise _invalid("body: Input should be a JSON object")
    model, max_tokens = _check_model(body), _check_max_tokens(body)
    messages = _check_messages(body)
    system_chars = _check_system(body.get("system"))
    _check_optional_fields(body)
    index, text = _last_user_text(messages)
    try:
        directives = parse_directives(text)
    except ValueError as err:
        raise _invalid(f"messages.{index}.content: {err}") from None
    chars = system_chars + sum(_content_chars(m["content"]) for m in messages)
    return _Parsed(
        model=model,
        max_tokens=max_tokens,
        stream=body.get("stream") is True,
        prompt_text=text,
        directives=directives,
        input_tokens=max(1, _tokens(chars)),
    )


def _check_model(body: dict[str, Any]) -> str:
    """Requires a non-empty string ``model``."""
    model = body.get("model")
    if model is None:
        raise _invalid("model: Field required")
    if not isinstance(model, str) or not model:
        raise _invalid("model: Input should be a non-empty string")
    return model


def _check_max_tokens(body: dict[str, Any]) -> int:
    """Requires a positive integer ``max_tokens``."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _invalid("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise _invalid("max_tokens: Input should be greater than or equal to 1")
    return max_tokens


def _check_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Requires a non-empty list of messages that starts with a user turn."""
    messages = body.get("messages")
    if messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: Input should be a non-empty list")
    for index, message in enumerate(messages):
        _check_message(index, message, is_last=index == len(messages) - 1)
    if messages[0]["role"] != "user":
        raise _invalid('messages.0.role: the first message must use the "user" role')
    return messages


def _check_message(index: int, message: object, *, is_last: bool) -> None:
    """Requires ``{role: user|assistant, content: str | blocks}``."""
    path = f"messages.{index}"
    if not isinstance(message, dict):
        raise _invalid(f"{path}: Input should be an object")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise _invalid(f"{path}.role: Input should be 'user' or 'assistant'")
    # The real API lets only a final assistant turn (a prefill) be empty.
    allow_empty = is_last and role == "assistant"
    _check_content(f"{path}.content", message.get("content"), allow_empty)


def _check_content(path: str, content: object, allow_empty: bool) -> None:
    """Requires a string or a list of content blocks, non-empty unless allowed."""
    if not isinstance(content, str | list):
        raise _invalid(f"{path}: Input should be a string or a list of content blocks")
    if not content and not allow_empty:
        raise _invalid(f"{path}: must be non-empty")
    if isinstance(content, list):
        for index, block in enumerate(content):
            _check_block(f"{path}.{index}", block)


def _check_block(path: str, block: object) -> None:
    """Requires a content block with a type, and text on text blocks."""
    if not isinstance(block, dict):
        raise _invalid(f"{path}: Input should be an object")
    block_type = block.get("type")
    if not isinstance(block_type, str) or not block_type:
        raise _invalid(f"{path}.type: Field required")
    if block_type == "text" and not isinstance(block.get("text"), str):
        raise _invalid(f"{path}.text: Input should be a valid string")


def _check_system(system: object) -> int:
    """Requires ``system`` to be a string or text blocks; returns its length."""
    if system is None:
        return 0
    if isinstance(system, str):
        return len(system)
    if not isinstance(system, list):
        raise _invalid("system: Input should be a string or a list of text blocks")
    for index, block in enumerate(system):
        _check_block(f"system.{index}", block)
        if block["type"] != "text":
            raise _invalid(f"system.{index}.type: Input should be 'text'")
    return sum(len(block["text"]) for block in system)


def _check_optional_fields(body: dict[str, Any]) -> None:
    """Checks temperature, stop_sequences, metadata and stream when present."""
    temperature = body.get("temperature")
    if temperature is not None and not _is_unit_number(temperature):
        raise _invalid("temperature: Input should be a number between 0 and 1")
    stops = body.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, list) and all(isinstance(stop, str) for stop in stops)
    ):
        raise _invalid("stop_sequences: Input should be a list of strings")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata: Input should be an object")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream: Input should be a valid boolean")


def _is_unit_number(value: object) -> bool:
    """Tells whether a JSON value is a number in 0..1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value <= 1


def _last_user_text(messages: list[dict[str, Any]]) -> tuple[int, str]:
    """Returns the index and text of the last user message."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "user":
            return index, _content_text(messages[index]["content"])
    raise _invalid('messages: at least one message must use the "user" role')


def _content_text(content: str | list[dict[str, Any]]) -> str:
    """Joins the text of a message's content."""
    if isinstance(content, str):
        return content
    return "\n".join(block["text"] for block in content if block["type"] == "text")


def _content_chars(content: str | list[dict[str, Any]]) -> int:
    """Counts the characters a message contributes to input tokens."""
    if isinstance(content, str):
        return len(content)
    return sum(
        len(block["text"]) if block["type"] == "text" else len(json.dumps(block))
        for block in content
    )


def _make_reply(parsed: _Parsed, plan: FaultSpec) -> _Reply:
    """Derives the deterministic answer from the last user message."""
    stop_reason = "max_tokens" if plan.max_tokens else "end_turn"
    if plan.empty:
        return _Reply(text=None, output_tokens=0, stop_reason=stop_reason)
    echo = _DIRECTIVE_RE.sub("", parsed.prompt_text).strip()[:_ECHO_CHARS]
    text = _REPLY_PREFIX + echo + ("\ud800" if plan.surrogate else "")
    limit_chars = parsed.max_tokens * _CHARS_PER_TOKEN
    if len(text) > limit_chars:
        return _Reply(text[:limit_chars], parsed.max_tokens, "max_tokens")
    return _Reply(text, _tokens(len(text)), stop_reason)


def _message_body(message_id: str, parsed: _Parsed, reply: _Reply) -> dict[str, Any]:
    """Builds the non-streaming Message object."""
    content = [] if reply.text is None else [{"type": "text", "text": reply.text}]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": parsed.model,
        "content": content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": parsed.input_tokens,
            "output_tokens": reply.output_tokens,
        },
    }


_Event = tuple[str, dict[str, Any]]


def _event(kind: str, **fields: Any) -> _Event:
    """Returns one stream event as its name and its data."""
    return kind, {"type": kind, **fields}


def _stream_events(message_id: str, parsed: _Parsed, reply: _Reply) -> list[_Event]:
    """Builds the Server-Sent Events of a streamed answer, in the API's order."""
    start = _message_body(message_id, parsed, reply)
    start.update(content=[], stop_reason=None)
    start["usage"]["output_tokens"] = min(1, reply.output_tokens)
    delta = {"stop_reason": reply.stop_reason, "stop_sequence": None}
    return [
        _event("message_start", message=start),
        *_text_block_events(reply.text),
        _event(
            "message_delta", delta=delta, usage={"output_tokens": reply.output_tokens}
        ),
        _event("message_stop"),
    ]


def _text_block_events(text: str | None) -> list[_Event]:
    """Builds the events of one text block; only a ping when there is no text."""
    if text is None:
        return [_event("ping")]
    block = {"type": "text", "text": ""}
    events = [
        _event("content_block_start", index=0, content_block=block),
        _event("ping"),
    ]
    for start in range(0, len(text), _STREAM_CHUNK_CHARS):
        piece = {
            "type": "text_delta",
            "text": text[start : start + _STREAM_CHUNK_CHARS],
        }
        events.append(_event("content_block_delta", index=0, delta=piece))
    events.append(_event("content_block_stop", index=0))
    return events


def _sse(name: str, data: Mapping[str, Any]) -> bytes:
    """Encodes one Server-Sent Event."""
    payload = json.dumps(data, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


def _api_key_from(request: web.Request) -> str:
    """Returns the key from ``x-api-key`` or ``Authorization: Bearer``, or ''."""
    key = request.headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else ""


def _close_transport(request: web.Request) -> None:
    """Closes the client connection; bytes already written are still flushed."""
    transport = request.transport
    if transport is not None:
        transport.close()


class _RateLimiter:
    """Per-key sliding 60 s windows of admitted requests and their tokens."""

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        """Keeps the limits; None means unlimited."""
        self._rpm = rpm
        self._tpm = tpm
        self._windows: dict[str, collections.deque[tuple[float, int]]] = {}

    @property
    def enabled(self) -> bool:
        """Whether any limit is configured."""
        return self._rpm is not None or self._tpm is not None

    def reset(self) -> None:
        """Forgets every window."""
        self._windows.clear()

    def admit(self, key: str, tokens: int) -> float:
        """Records the request if it fits.

        Returns:
            0.0 when admitted, else the seconds until the window frees enough.
        """
        now = time.monotonic()
        events = self._window(key, now)
        wait_s = max(
            self._rpm_wait_s(events, now), self._tpm_wait_s(events, tokens, now)
        )
        if wait_s <= 0:
            events.append((now, tokens))
        return wait_s

    def headers(self, key: str) -> dict[str, str]:
        """Returns the ``anthropic-ratelimit-*`` headers of the configured limits."""
        now = time.monotonic()
        events = self._window(key, now)
        # The real API's reset is when the limit is fully replenished.
        reset = _rfc3339_in(events[-1][0] + _WINDOW_S - now if events else 0.0)
        headers: dict[str, str] = {}
        if self._rpm is not None:
            headers.update(_limit_headers("requests", self._rpm, len(events), reset))
        if self._tpm is not None:
            used = sum(tokens for _, tokens in events)
            for family in ("tokens", "input-tokens", "output-tokens"):
                headers.update(_limit_headers(family, self._tpm, used, reset))
        return headers

    def _window(self, key: str, now: float) -> collections.deque[tuple[float, int]]:
        """Returns the key's events still inside the window."""
        events = self._windows.setdefault(key, collections.deque())
        while events and events[0][0] + _WINDOW_S <= now:
            events.popleft()
        return events

    def _rpm_wait_s(
        self, events: collections.deque[tuple[float, int]], now: float
    ) -> float:
        """Seconds until one more request fits the rpm limit."""
        if self._rpm is None or len(events) < self._rpm:
            return 0.0
        return events[len(events) - self._rpm][0] + _WINDOW_S - now

    def _tpm_wait_s(
        self, events: collections.deque[tuple[float, int]], tokens: int, now: float
    ) -> float:
        """Seconds until ``tokens`` more fit the tpm limit; a full window if never."""
        if self._tpm is None:
            return 0.0
        excess = sum(spent for _, spent in events) + tokens - self._tpm
        if excess <= 0:
            return 0.0
        for stamp, spent in events:
            excess -= spent
            if excess <= 0:
                return stamp + _WINDOW_S - now
        return _WINDOW_S


def _limit_headers(family: str, limit: int, used: int, reset: str) -> dict[str, str]:
    """Returns one family of ``anthropic-ratelimit-*`` headers."""
    prefix = f"anthropic-ratelimit-{family}"
    return {
        f"{prefix}-limit": str(limit),
        f"{prefix}-remaining": str(max(0, limit - used)),
        f"{prefix}-reset": reset,
    }


@web.middleware
async def _error_envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers every error in the API's envelope and keeps the server alive."""
    try:
        return await handler(request)
    except _ApiError as err:
        return _error_response(
            err.status, err.message, _new_id("req_sim_"), err.headers
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(exc.status, exc.reason, _new_id("req_sim_"))
    except Exception:
        log.exception("simulator.handler_failed", extra={"path": request.path})
        return _error_response(500, "Internal server error", _new_id("req_sim_"))


class Simulator:
    """Holds the app, counters, fault queue.

    Use it as ``async with Simulator(config) as sim:``; ``sim.base_url`` then points
    at the running server. Every method runs on the simulator's event loop.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        """Prepares a stopped simulator.

        Args:
            config: Settings; the defaults when None.
            rng: Source of jitter and random faults; seed one for repeatable runs.
        """
        self.config = config if config is not None else SimulatorConfig()
        self._rng = rng if rng is not None else random.Random()
        self._limiter = _RateLimiter(self.config.rpm, self.config.tpm)
        self._faults: collections.deque[FaultSpec] = collections.deque()
        self._fail_counts: collections.Counter[str] = collections.Counter()
        self._requests = 0
        self._by_status: collections.Counter[str] = collections.Counter()
        self._by_prompt: collections.Counter[str] = collections.Counter()
        self._billed_by_prompt: collections.Counter[str] = collections.Counter()
        self._tokens_by_prompt: dict[str, tuple[int, int]] = {}
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port; valid once started."""
        if self._port is None:
            raise RuntimeError("simulator is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The server's URL, e.g. ``http://127.0.0.1:41234``; valid once started."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def stats(self) -> SimStats:
        """A snapshot of the counters; see the module docstring for the keys."""
        return SimStats(
            requests=self._requests,
            by_status=MappingProxyType(dict(self._by_status)),
            by_prompt=MappingProxyType(dict(self._by_prompt)),
            billed_by_prompt=MappingProxyType(dict(self._billed_by_prompt)),
            tokens_by_prompt=MappingProxyType(dict(self._tokens_by_prompt)),
        )

    def queue_faults(self, faults: Iterable[FaultSpec | Mapping[str, object]]) -> int:
        """Appends scripted faults, consumed one per validated request.

        Args:
            faults: FaultSpecs or their JSON form (see ``FaultSpec.from_mapping``).

        Returns:
            The number of faults now queued.

        Raises:
            ValueError: An entry is invalid; nothing is queued then.
        """
        specs = [
            fault if isinstance(fault, FaultSpec) else FaultSpec.from_mapping(fault)
            for fault in faults
        ]
        self._faults.extend(specs)
        return len(self._faults)

    def reset(self) -> None:
        """Clears counters, the fault queue, fail_times progress and rate windows."""
        self._requests = 0
        self._by_status.clear()
        self._by_prompt.clear()
        self._billed_by_prompt.clear()
        self._tokens_by_prompt.clear()
        self._faults.clear()
        self._fail_counts.clear()
        self._limiter.reset()

    async def start(self) -> None:
        """Binds the port and starts serving.

        Raises:
            RuntimeError: Already started.
            OSError: The port could not be bound.
        """
        if self._runner is not None:
            raise RuntimeError("simulator is already started")
        self._closing = asyncio.Event()
        # Cancelling handlers when the client leaves is what ends a `hang`.
        runner = web.AppRunner(
            self._build_app(),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        site = web.TCPSite(
            runner, self.config.host, self.config.port, ssl_context=self._tls()
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._port = runner, site.port
        log.debug(
            "simulator.started", extra={"host": self.config.host, "port": site.port}
        )

    def _tls(self) -> ssl.SSLContext | None:
        if self.config.tls_cert is None or self.config.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

    async def stop(self) -> None:
        """Stops serving; pending hangs and delays end at once. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()
        log.debug("simulator.stopped", extra={"port": self._port})

    async def __aenter__(self) -> Self:
        """Starts the simulator."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stops the simulator."""
        await self.stop()

    def _build_app(self) -> web.Application:
        """Wires the routes."""
        app = web.Application(
            middlewares=[_error_envelope], client_max_size=_MAX_BODY_BYTES
        )
        app.router.add_post("/v1/messages", self._handle_messages)
        app.router.add_get("/_sim/stats", self._handle_stats)
        app.router.add_post("/_sim/faults", self._handle_faults)
        app.router.add_post("/_sim/reset", self._handle_reset)
        return app

    async def _handle_stats(self, request: web.Request) -> web.Response:
        """Serves ``GET /_sim/stats``."""
        return web.json_response(self.stats.as_dict())

    async def _handle_reset(self, request: web.Request) -> web.Response:
        """Serves ``POST /_sim/reset``."""
        self.reset()
        return web.json_response({"reset": True})

    async def _handle_faults(self, request: web.Request) -> web.Response:
        """Serves ``POST /_sim/faults`` with ``{"faults": [...]}``."""
        body = await _read_json(request)
        faults = body.get("faults") if isinstance(body, dict) else None
        if not isinstance(faults, list):
            raise _invalid("faults: Input should be a list")
        specs: list[FaultSpec] = []
        for index, entry in enumerate(faults):
            if not isinstance(entry, dict):
                raise _invalid(f"faults.{index}: Input should be an object")
            try:
                specs.append(FaultSpec.from_mapping(entry))
            except ValueError as err:
                raise _invalid(f"faults.{index}.{err}") from None
        return web.json_response({"queued": self.queue_faults(specs)})

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        """Serves ``POST /v1/messages`` and records its outcome."""
        self._requests += 1
        exchange = _Exchange(request_id=_new_id("req_sim_"))
        try:
            return await self._serve_messages(request, exchange)
        except _ApiError as err:
            self._finish(exchange, str(err.status))
            return _error_response(
                err.status, err.message, exchange.request_id, err.headers
            )
        except Exception:
            if exchange.outcome is not None:
                raise
            log.exception("simulator.handler_failed", extra={"path": request.path})
            self._finish(exchange, "500")
            return _error_response(500, "Internal server error", exchange.request_id)
        finally:
            self._finish(exchange, "dropped")

    async def _serve_messages(
        self, request: web.Request, exchange: _Exchange
    ) -> web.StreamResponse:
        """Runs the steps listed in the module docstring."""
        key = self._authenticate(request)
        _check_version(request)
        parsed = _parse_body(await _read_json(request))
        task_key = prompt_key(parsed.prompt_text)
        self._by_prompt[task_key] += 1
        plan = self._plan_for(parsed)
        if await self._closed_within(self._delay_s(plan)):
            return self._drop(request, exchange, "dropped")
        if plan.hang:
            return await self._hang(request, exchange)
        self._raise_injected_status(plan)
        reply = _make_reply(parsed, plan)
        headers = self._admit(key, parsed.input_tokens + reply.output_tokens)
        self._billed_by_prompt[task_key] += 1
        used_in, used_out = self._tokens_by_prompt.get(task_key, (0, 0))
        self._tokens_by_prompt[task_key] = (
            used_in + parsed.input_tokens,
            used_out + reply.output_tokens,
        )
        headers["request-id"] = exchange.request_id
        message_id = _new_id("msg_sim_")
        if plan.cut:
            return await self._cut(request, exchange, parsed, reply, headers)
        if parsed.stream:
            events = _stream_events(message_id, parsed, reply)
            return await self._stream(request, exchange, events, headers)
        self._finish(exchange, "200")
        return web.json_response(
            _message_body(message_id, parsed, reply), headers=headers
        )

    def _finish(self, exchange: _Exchange, outcome: str) -> None:
        """Records the request's outcome once; later calls are no-ops."""
        if exchange.outcome is None:
            exchange.outcome = outcome
            self._by_status[outcome] += 1

    def _authenticate(self, request: web.Request) -> str:
        """Returns the accepted key, or raises 401 without echoing it."""
        key = _api_key_from(request)
        accepted = self.config.api_keys
        if not key or (accepted is not None and key not in accepted):
            raise _ApiError(401, "invalid x-api-key")
        return key

    def _plan_for(self, parsed: _Parsed) -> FaultSpec:
        """Chooses this request's faults: scripted, else directives, else random."""
        if self._faults:
            return self._faults.popleft()
        plan = parsed.directives
        if plan.fail_times is not None:
            plan = self._count_failure(parsed.prompt_text, plan)
        if not plan.fails and self._rng.random() < self.config.fail_rate:
            status = self._rng.choice(_RANDOM_FAULT_STATUSES)
            plan = dataclasses.replace(plan, status=status)
        return plan

    def _count_failure(self, text: str, plan: FaultSpec) -> FaultSpec:
        """Applies ``fail_times``: faults for the first N identical texts only."""
        key = prompt_key(text)
        if self._fail_counts[key] >= (plan.fail_times or 0):
            return dataclasses.replace(
                plan, fail_times=None, status=None, cut=False, hang=False
            )
        self._fail_counts[key] += 1
        status = plan.status
        if status is None and not (plan.cut or plan.hang):
            status = _DEFAULT_FAIL_STATUS
        return dataclasses.replace(plan, fail_times=None, status=status)

    def _delay_s(self, plan: FaultSpec) -> float:
        """Returns the latency to add before answering."""
        jitter_ms = self.config.latency_jitter_ms
        extra_ms = self._rng.uniform(0, jitter_ms) if jitter_ms else 0.0
        return (self.config.latency_ms + extra_ms + plan.latency_ms) / 1000

    async def _closed_within(self, delay_s: float) -> bool:
        """Waits ``delay_s``; returns True at once if the simulator stops first."""
        if delay_s <= 0:
            return self._closing.is_set()
        try:
            await asyncio.wait_for(self._closing.wait(), delay_s)
        except TimeoutError:
            return False
        return True

    def _drop(
        self, request: web.Request, exchange: _Exchange, outcome: str
    ) -> web.Response:
        """Closes the connection without an answer."""
        self._finish(exchange, outcome)
        _close_transport(request)
        # Never reaches the client: the connection is already closing.
        return web.Response(status=503)

    async def _hang(self, request: web.Request, exchange: _Exchange) -> web.Response:
        """Never answers; ends when the client leaves or the simulator stops."""
        log.debug("simulator.fault_injected", extra={"fault": "hang"})
        try:
            await self._closing.wait()
        finally:
            self._finish(exchange, "hang")
        return self._drop(request, exchange, "hang")

    def _raise_injected_status(self, plan: FaultSpec) -> None:
        """Raises the plan's error status, with retry-after when it has one."""
        status = plan.status
        if status is None or status == 200:
            return
        retry_after_s = plan.retry_after_s
        if retry_after_s is None and status == 429:
            retry_after_s = 1.0
        headers = {} if retry_after_s is None else _retry_after_headers(retry_after_s)
        log.debug(
            "simulator.fault_injected", extra={"fault": "status", "status": status}
        )
        message = _FAULT_MESSAGES.get(status, f"Simulated error {status}")
        raise _ApiError(status, message, headers)

    def _admit(self, key: str, tokens: int) -> dict[str, str]:
        """Applies rpm and tpm; returns the rate limit headers or raises 429."""
        if not self._limiter.enabled:
            return {}
        wait_s = self._limiter.admit(key, tokens)
        headers = self._limiter.headers(key)
        if wait_s > 0:
            log.debug("simulator.rate_limited", extra={"wait_s": round(wait_s, 3)})
            headers.update(_retry_after_headers(wait_s))
            raise _ApiError(
                429, "This request would exceed your rate limit (simulated)", headers
            )
        return headers

    async def _stream(
        self,
        request: web.Request,
        exchange: _Exchange,
        events: list[_Event],
        headers: Mapping[str, str],
    ) -> web.StreamResponse:
        """Sends the answer as Server-Sent Events."""
        response = web.StreamResponse(status=200, headers=_sse_headers(headers))
        self._finish(exchange, "200")
        await response.prepare(request)
        try:
            for name, data in events:
                await response.write(_sse(name, data))
        except ConnectionError:
            log.debug("simulator.client_gone", extra={"path": request.path})
        return response

    async def _cut(
        self,
        request: web.Request,
        exchange: _Exchange,
        parsed: _Parsed,
        reply: _Reply,
        headers: Mapping[str, str],
    ) -> web.StreamResponse:
        """Starts a successful answer, then closes the connection mid-body."""
        log.debug("simulator.fault_injected", extra={"fault": "cut"})
        self._finish(exchange, "cut")
        message_id = _new_id("msg_sim_")
        if parsed.stream:
            events = _stream_events(message_id, parsed, reply)
            payload = b"".join(_sse(name, data) for name, data in events)
            response = web.StreamResponse(status=200, headers=_sse_headers(headers))
        else:
            payload = json.dumps(_message_body(message_id, parsed, reply)).encode()
            response = web.StreamResponse(status=200, headers=headers)
            response.content_type = "application/json"
            # A full Content-Length makes the short body a protocol error.
            response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        _close_transport(request)
        return response


def _sse_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Adds the event-stream headers to an answer's headers."""
    return {
        **headers,
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
    }


async def serve_forever(
    config: SimulatorConfig, stop: asyncio.Event | None = None
) -> None:
    """Runs until `stop` is set or the task is cancelled.

    Logs ``simulator.listening`` with the host and the actual port once bound, and
    prints nothing.

    Args:
        config: The simulator's settings.
        stop: Set it to stop; None runs until the task is cancelled.
    """
    stop_event = stop if stop is not None else asyncio.Event()
    async with Simulator(config) as sim:
        log.info("simulator.listening", extra={"host": config.host, "port": sim.port})
        await stop_event.wait()


__all__ = [
    "ENV_API_KEYS",
    "ERROR_TYPES",
    "FaultSpec",
    "SimStats",
    "Simulator",
    "SimulatorConfig",
    "error_type_for",
    "keys_from_env",
    "parse_directives",
    "prompt_key",
    "serve_forever",
]
