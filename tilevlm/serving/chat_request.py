"""A chat completion request's JSON, checked field by field into a `ChatRequest`, as OpenAI's
API defines it (and vLLM and transformers serve implement it). Every wrong type or value is a
400 naming the field; what this server does not do (n > 1, tools, logprobs, penalties, ...) is a
400 too, never silently ignored. Fields no one acts on (user, metadata, ...) are ignored, as
vLLM does."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tilevlm.inference.sampling import SamplingParams
from tilevlm.preprocessing.chat_template import IMAGE_PLACEHOLDER
from tilevlm.serving.errors import ApiError, bad_request
from tilevlm.serving.settings import ServeSettings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]  # tilevlm messages: string content, `<image>` per image
    image_urls: list[tuple[str, str]]  # (url, the field it came from), in placeholder order
    max_tokens: int | None  # None: the server's default
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: Any, settings: ServeSettings) -> ChatRequest:
    """The request, or an ApiError (400; 404 for a model this server does not serve)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _refuse_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("'model' must be a string naming the served model", "model")
    if model != settings.model_name:
        raise ApiError(404, f"the model {model[:100]!r} does not exist; this server serves "
                       f"{settings.model_name!r}", "model", code="model_not_found")
    messages, images = _messages(body.get("messages"), settings)
    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true",
                          "stream_options")
    include_usage = _optional(options or {}, "include_usage", bool, False,
                              "stream_options.include_usage")
    return ChatRequest(messages=messages, image_urls=images, max_tokens=_max_tokens(body, settings),
                       sampling=_sampling(body), stop=_stop(body, settings),
                       seed=_seed(body), stream=stream, include_usage=include_usage)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """What this server does not do: a clear 400 instead of an answer that ignores it."""
    n = body.get("n", 1)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n != 1):
        raise bad_request("only 'n': 1 is supported (one choice per request)", "n", "unsupported")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(f"'{name}' are not supported by this server", name, "unsupported")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise bad_request(f"'{name}' is not supported by this server", name, "unsupported")
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        name = "logprobs" if body.get("logprobs") else "top_logprobs"
        raise bad_request("log probabilities are not supported by this server", name,
                          "unsupported")
    for name in ("frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if value not in (None, 0, 0.0) or isinstance(value, bool):
            raise bad_request(f"'{name}' is not supported by this server (only 0)", name,
                              "unsupported")
    if body.get("logit_bias"):
        raise bad_request("'logit_bias' is not supported by this server", "logit_bias",
                          "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("only the text response format is supported", "response_format",
                          "unsupported")
    if body.get("modalities") not in (None, ["text"]) or body.get("audio") is not None:
        raise bad_request("only text answers are supported", "modalities", "unsupported")


def _messages(value: Any, settings: ServeSettings
              ) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list of messages", "messages")
    if len(value) > settings.max_messages:
        raise bad_request(f"{len(value)} messages, more than this server's limit of "
                          f"{settings.max_messages}", "messages")
    messages, images = [], []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object with 'role' and 'content'", param)
        role = message.get("role")
        if role in ("tool", "function"):
            raise bad_request(f"{param}: the {role!r} role is not supported (no tools)",
                              f"{param}.role", "unsupported")
        if role not in ROLES:
            raise bad_request(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r:.50}",
                              f"{param}.role")
        text, urls = _content(message.get("content"), f"{param}.content", role)
        images += urls
        if len(images) > settings.max_images:
            raise bad_request(f"more than {settings.max_images} images in one request (this "
                              "server's limit)", param, "too_many_images")
        messages.append({"role": ROLES[role], "content": text})
    return messages, images


def _content(value: Any, param: str, role: str) -> tuple[str, list[tuple[str, str]]]:
    """A message's content as one text, each image an `<image>` placeholder, and its images."""
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param)
    pieces, images = [], []
    for k, part in enumerate(value):
        where = f"{param}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}.text must be a string", f"{where}.text")
            pieces.append(text)
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{where}: images are only allowed in user messages", where)
            images.append((_image_url(part.get("image_url"), f"{where}.image_url"), where))
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind in ("input_audio", "file", "refusal", "video_url"):
            raise bad_request(f"{where}: {kind!r} parts are not supported (text and image_url)",
                              f"{where}.type", "unsupported")
        else:
            raise bad_request(f"{where} must be an object with 'type' 'text' or 'image_url'",
                              f"{where}.type")
    return "".join(pieces), images


def _image_url(value: Any, param: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param} must be an object with a 'url' string", param)
    return url


def _optional(body: dict[str, Any], name: str, kind: type, default: Any,
              param: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad_request(f"'{param or name}' must be {_KIND_NAMES[kind]}, got "
                          f"{_json_type(value)}", param or name)
    return value


_KIND_NAMES = {bool: "a boolean", dict: "an object", str: "a string", int: "an integer",
               float: "a number"}


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _integer(body: dict[str, Any], name: str) -> int | None:
    return _optional(body, name, int, None)


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number, got {_json_type(value)}", name)
    return float(value)


def _max_tokens(body: dict[str, Any], settings: ServeSettings) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    value = _integer(body, name)
    if value is None:
        return None
    if value < 1:
        raise bad_request(f"'{name}' must be >= 1, got {value}", name)
    if value > settings.max_tokens:
        raise bad_request(f"'{name}' {value} is more than this server's limit of "
                          f"{settings.max_tokens} new tokens", name)
    return value


def _sampling(body: dict[str, Any]) -> SamplingParams:
    temperature = _number(body, "temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad_request(f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _integer(body, "top_k")  # vLLM's extension; -1 or 0: off
    if top_k is not None and top_k < -1:
        raise bad_request(f"'top_k' must be >= -1, got {top_k}", "top_k")
    # OpenAI's default temperature is 1; a request that names none samples, as with OpenAI.
    return SamplingParams(temperature=1.0 if temperature is None else temperature,
                          top_p=1.0 if top_p is None else top_p, top_k=max(top_k or 0, 0))


def _stop(body: dict[str, Any], settings: ServeSettings) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(stops) > settings.max_stop:
        raise bad_request(f"at most {settings.max_stop} stop texts, got {len(stops)}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"a stop text may have at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(s for s in stops if s)


def _seed(body: dict[str, Any]) -> int | None:
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise bad_request(f"'seed' must be in [0, {MAX_SEED}], got {seed}", "seed")
    return seed
