"""A tokenizer's own chat template (the Jinja `chat_template` of its tokenizer_config.json, e.g.
SmolLM2-Instruct's with its default system prompt), rendered as `transformers` renders it and
cut into the same (text, counts for the loss) segments as the built-in ChatML. Messages come
with their `<image>` placeholders (the processor puts the images' tokens in after rendering).

The cut comes from renders of growing prefixes of the conversation: an assistant message's
segment is what its message adds after the generation prompt (its content and whatever the
template closes it with), everything else is context. A template whose render of a prefix is
not a prefix of the longer render cannot be cut so, and is refused with a ValueError.

Templates are files we did not write: they render in Jinja's immutable sandbox with a bound on
their work (loop iterations, time, the size of values they build: `MAX_LOOP_STEPS`, ...); a
template over it, or one that raises, is a ValueError (one line on the command line), never a
hang or a traceback.
"""

from __future__ import annotations

import contextvars
import functools
import time
from typing import Any, Callable, Iterator

from tilevlm.preprocessing.chat_template import IMAGE_PLACEHOLDER, check_message, content_parts

Render = Callable[[list[dict[str, str]], bool], str]


# The bound on a template's work in one render (a chat template loops over messages and their
# parts: a few thousand steps at most): loop iterations of all its loops together, wall-clock
# time (checked at each iteration), and the size of a value `*`, `+`, `~` or `**` may make.
MAX_LOOP_STEPS = 200_000
MAX_RENDER_SECONDS = 5.0
MAX_VALUE_SIZE = 1 << 24  # characters of a string, items of a list, bits of an integer


class TemplateTooCostly(ValueError):
    """A chat template that did more work than the bound allows."""


_budget: contextvars.ContextVar["_Budget"] = contextvars.ContextVar("tilevlm_template_budget")


class _Budget:
    """What one render may still do."""

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_LOOP_STEPS:
            raise TemplateTooCostly(f"the chat_template ran more than {MAX_LOOP_STEPS} loop "
                                    "iterations in one render")
        if time.monotonic() > self.deadline:
            raise TemplateTooCostly(f"the chat_template took more than {MAX_RENDER_SECONDS:g} s "
                                    "to render")


def _counted(iterable: Any) -> Iterator[Any]:
    """Every loop of a template iterates through this: each item is a step of the budget."""
    budget = _budget.get(None) or _Budget()
    for item in iterable:
        budget.step()
        yield item


def _checked_concat(*values: Any) -> str:
    """`a ~ b ~ ...`, refused when the result would be too long."""
    text = "".join(str(v) for v in values)
    _check_size(len(text), "~")
    return text


def _check_size(size: int, what: str) -> None:
    if size > MAX_VALUE_SIZE:
        raise TemplateTooCostly(f"the chat_template builds a value of size {size} with {what}, "
                                f"more than {MAX_VALUE_SIZE} (characters, items or bits)")


def _sized(value: Any) -> bool:
    return isinstance(value, (str, list, tuple))


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse `*`, `+` and `**` whose result would be huge, before it is computed."""
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
    if operator == "*" and (_sized(left) or _sized(right)):
        seq, n = (left, right) if _sized(left) else (right, left)
        if isinstance(n, int):
            _check_size(len(seq) * max(n, 0), "*")
    elif operator == "+" and _sized(left) and _sized(right):
        _check_size(len(left) + len(right), "+")
    elif operator == "**" and ints and right > 0 and abs(left) > 1:
        _check_size(right * abs(left).bit_length(), "**")


def _environment() -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """Jinja's immutable sandbox, with the size checks of `_check_binop`."""

        intercepted_binops = frozenset(["*", "+", "**"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.tilevlm_loop = _counted
    env.tilevlm_concat = _checked_concat
    return env


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    from jinja2.exceptions import TemplateError

    env = _environment()
    try:
        return env.from_string(_bounded(env.parse(template)))
    except TemplateError as e:
        raise ValueError(f"the tokenizer's chat_template is not valid Jinja ({e})") from None


def _bounded(tree: Any) -> Any:
    """The parsed template with every loop's items counted (`_counted`) and every `~` checked
    (`_checked_concat`), through attributes of the environment, which a template cannot
    rebind. A recursive loop (`loop(...)` inside it) is refused: its inner calls would escape
    the count."""
    from jinja2 import nodes

    for loop in list(tree.find_all(nodes.For)):
        if loop.recursive:
            raise ValueError("the tokenizer's chat_template uses a recursive for loop, which "
                             "tilevlm does not render")
        loop.iter = nodes.Call(nodes.EnvironmentAttribute("tilevlm_loop"), [loop.iter], [],
                               None, None)
    for concat in list(tree.find_all(nodes.Concat)):
        concat.nodes = [nodes.Call(nodes.EnvironmentAttribute("tilevlm_concat"),
                                   list(concat.nodes), [], None, None)]
    return tree


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
        reset = _budget.set(_Budget())
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **tokens)
        except TemplateTooCostly as e:
            raise TemplateTooCostly(f"{e}; refused (a chat template needs far less)") from None
        except TemplateError as e:
            raise ValueError(f"the tokenizer's chat_template failed: {e}") from None
        except Exception as e:  # noqa: BLE001 - whatever the template's code raises
            raise ValueError(f"the tokenizer's chat_template failed: {type(e).__name__}: "
                             f"{e}") from None
        finally:
            _budget.reset(reset)

    return render


_PROBE = "tilevlm-probe-text"
_PROBE_AFTER = "tilevlm-probe-after"


def _writes(render: Render, content: str, expected: str) -> bool:
    """Whether a user message of `content` renders with `expected` in it (and, when it holds
    images, exactly as many `<image>`); any failure of the template: no."""
    try:
        text = render([{"role": "user", "content": content}], True)
    except TemplateTooCostly:
        raise  # not a form it rejects: a template that must be refused
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
