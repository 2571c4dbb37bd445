"""A tokenizer's own chat template (the Jinja `chat_template` of its tokenizer_config.json, e.g.
SmolLM2-Instruct's with its default system prompt), rendered as `transformers` renders it and
cut into the same (text, counts for the loss) segments as the built-in ChatML. Messages come
with their `<image>` placeholders (the processor puts the images' tokens in after rendering).

The cut comes from renders of growing prefixes of the conversation: an assistant message's
segment is what its message adds after the generation prompt (its content and whatever the
template closes it with), everything else is context. A template whose render of a prefix is
not a prefix of the longer render cannot be cut so, and is refused with a ValueError.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from tilevlm.preprocessing.chat_template import IMAGE_PLACEHOLDER, check_message, content_parts

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


# How a message's content goes into a template (`content_form`): "parts", split at `<image>` into
# image and text parts, as transformers' processors are given a multimodal message (SmolVLM's
# template writes `User:<image>...` for an image-first message and `User: ...` otherwise);
# "string", the text as it is; "text", the text as one text part (a template that reads lists of
# parts but does not write an image part as `<image>`, so the placeholder stays in the text).
CONTENT_FORMS = ("parts", "string", "text")


def renderer(template: str, form: str = "string", **special_tokens: str | None) -> Render:
    """render(messages, add_generation_prompt) -> text, with `bos_token`/`eos_token` defined and
    each message's content in `form` (CONTENT_FORMS; `content_form` tells which a template
    needs)."""
    from jinja2.exceptions import TemplateError

    if form not in CONTENT_FORMS:
        raise ValueError(f"content form must be one of {', '.join(CONTENT_FORMS)}, got {form!r}")
    compiled = _compiled(template)
    tokens = {k: v or "" for k, v in special_tokens.items()}
    shape = {"string": lambda text: text, "parts": content_parts,
             "text": lambda text: [{"type": "text", "text": text}]}[form]

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        messages = [{**m, "content": shape(m["content"])} for m in messages]
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **tokens)
        except TemplateError as e:
            raise ValueError(f"the tokenizer's chat_template failed: {e}") from None

    return render


_PROBE = "tilevlm-probe-text"
_PROBE_AFTER = "tilevlm-probe-after"


def _writes(render: Render, content: str, expected: str) -> bool:
    """Whether a user message of `content` renders with `expected` in it (and, when it holds
    images, exactly as many `<image>`); any failure of the template: no."""
    try:
        text = render([{"role": "user", "content": content}], True)
    except Exception:  # noqa: BLE001 - a probe: a template that fails on this form rejects it
        return False
    images = content.count(IMAGE_PLACEHOLDER)
    return expected in text and (not images or text.count(IMAGE_PLACEHOLDER) == images)


@functools.lru_cache(maxsize=8)
def content_form(template: str, **special_tokens: str | None) -> str:
    """Which CONTENT_FORMS the template gets: "parts" when it writes image parts as `<image>`
    where they stand (checked before and between text), else "string" when it writes a string
    content, else "text" when it writes a list's text part; a ValueError when it writes the text
    in none of these ways (every prompt would be dropped)."""
    image, probe = IMAGE_PLACEHOLDER, _PROBE
    checks = {"parts": [(image + probe, image + probe),
                        (probe + image + _PROBE_AFTER, probe + image + _PROBE_AFTER)],
              "string": [(probe, probe)], "text": [(probe, probe)]}
    for form in CONTENT_FORMS:
        render = renderer(template, form, **special_tokens)
        if all(_writes(render, content, expected) for content, expected in checks[form]):
            return form
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
