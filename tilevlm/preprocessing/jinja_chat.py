"""A tokenizer's own chat template (the Jinja `chat_template` of its tokenizer_config.json, e.g.
SmolLM2-Instruct's with its default system prompt), rendered as `transformers` renders it and
cut into the same (text, counts for the loss) segments as the built-in ChatML.

The cut comes from renders of growing prefixes of the conversation: an assistant message's
segment is what its message adds after the generation prompt (its content and whatever the
template closes it with), everything else is context. A template whose render of a prefix is
not a prefix of the longer render cannot be cut so, and is refused with a ValueError.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from tilevlm.preprocessing.chat_template import check_message

Render = Callable[[list[dict[str, str]], bool], str]


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"the tokenizer's chat_template is not valid Jinja ({e})") from None


def renderer(template: str, list_content: bool = False, **special_tokens: str | None) -> Render:
    """render(messages, add_generation_prompt) -> text, with `bos_token`/`eos_token` defined.
    `list_content`: each message's text goes in as `[{"type": "text", "text": ...}]`, for
    templates that read content only as a list of parts (SmolVLM's, say)."""
    from jinja2.exceptions import TemplateError

    compiled = _compiled(template)
    tokens = {k: v or "" for k, v in special_tokens.items()}

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if list_content:
            messages = [{**m, "content": [{"type": "text", "text": m["content"]}]}
                        for m in messages]
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **tokens)
        except TemplateError as e:
            raise ValueError(f"the tokenizer's chat_template failed: {e}") from None

    return render


_PROBE = "tilevlm-probe-text"


@functools.lru_cache(maxsize=8)
def content_form(template: str, **special_tokens: str | None) -> bool:
    """Whether the template needs list-form content: False when it writes a message whose
    content is a string, True when it writes it only as a list of parts; a ValueError when it
    writes the text neither way (every prompt would be dropped)."""
    for list_content in (False, True):
        render = renderer(template, list_content, **special_tokens)
        try:
            if _PROBE in render([{"role": "user", "content": _PROBE}], True):
                return list_content
        except ValueError:
            continue
    raise ValueError("the chat_template writes no message text, neither as a string nor as a "
                     "list of text parts; remove it to use ChatML")


def template_segments(render: Render, messages: list[dict[str, str]],
                      add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The conversation as the template writes it, in pieces, each with whether it counts for
    the loss (an assistant message's own text and closing markers)."""
    segments: list[tuple[str, bool]] = []
    done = render([], False)
    if done:
        segments.append((done, False))
    for i, message in enumerate(messages):
        check_message(message, i)
        reply = message["role"] == "assistant"
        if reply:
            done = _extend(segments, done, render(messages[:i], True), False)
        done = _extend(segments, done, render(messages[:i + 1], False), reply)
    if add_generation_prompt:
        _extend(segments, done, render(messages, True), False)
    return segments


def _extend(segments: list[tuple[str, bool]], done: str, text: str, labelled: bool) -> str:
    if not text.startswith(done):
        raise ValueError("the tokenizer's chat_template does not write a conversation as its "
                         "earlier turns followed by the new one, so its replies cannot be "
                         "told apart for training")
    if len(text) > len(done):
        segments.append((text[len(done):], labelled))
    return text
