"""The chat format: ChatML, the `<image>` placeholder, and message validation, in one place.

A conversation is a list of {"role", "content"} dicts. ChatML writes each message as
`<|im_start|>{role}\n{content}<|im_end|>\n`; a generation prompt appends
`<|im_start|>assistant\n`. Training labels keep an assistant message's content and its
`<|im_end|>` (so the model learns to stop), nothing else. `CHATML_JINJA` is the same template in
Jinja, saved in tokenizer_config.json for `transformers` users (a test renders both and compares).

A model's own template is rendered with the `<image>` placeholders still in the text (for a
template that reads content as a list of parts, each becomes an image part, as transformers'
processors are given them: `content_parts`), and each placeholder of the rendered text is then
replaced by its image's tokens (`fill_placeholders`), so an image-first message is written the way
the template writes an image part.
"""

from __future__ import annotations

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a message's text

CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GENERATION_PROMPT = f"{IM_START}assistant\n"


class PlaceholderMismatch(ValueError):
    """The text holds a different number of `<image>` placeholders than there are images."""


def check_message(message: object, index: int = 0) -> None:
    """A ValueError unless `message` is a dict with a known role and string content."""
    if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
        raise ValueError(f"message {index}: expected a dict with role in {CHAT_ROLES}, "
                         f"got {message!r:.200}")
    if not isinstance(message.get("content"), str):
        raise ValueError(f"message {index}: content must be a string, "
                         f"got {type(message.get('content')).__name__}")


def chat_segments(messages: list[dict[str, str]], add_generation_prompt: bool = False
                  ) -> list[tuple[str, bool]]:
    """The conversation as ChatML text pieces, each with whether it counts for the loss."""
    segments: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        check_message(m, i)
        reply = m["role"] == "assistant"
        segments += [(f"{IM_START}{m['role']}\n", False), (m["content"], reply), (IM_END, reply),
                     ("\n", False)]
    if add_generation_prompt:
        segments.append((GENERATION_PROMPT, False))
    return segments


def place_image_placeholders(messages: list[dict[str, str]], n_images: int
                             ) -> list[dict[str, str]]:
    """The messages with one `<image>` per image: as written, or, when the text holds none, all
    of them at the start of the first user message. A ValueError when the counts differ or there
    is no user message to put them in."""
    found = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if found == n_images:
        return messages
    if found:
        raise PlaceholderMismatch(f"{found} {IMAGE_PLACEHOLDER} placeholders in the text but "
                         f"{n_images} images")
    for i, m in enumerate(messages):
        if m["role"] == "user":
            first = {**m, "content": IMAGE_PLACEHOLDER * n_images + m["content"]}
            return [*messages[:i], first, *messages[i + 1:]]
    raise ValueError("has images but no user message to put them in")


def content_parts(text: str) -> list[dict[str, str]]:
    """A message's text as the list of parts transformers' processors take: `{"type": "image"}`
    for each `<image>`, `{"type": "text", "text": ...}` for the text between them (empty pieces
    left out; a message with no text and no image is one empty text part)."""
    parts: list[dict[str, str]] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts or [{"type": "text", "text": ""}]


def fill_placeholders(texts: list[str], images: list[str]) -> list[str]:
    """`texts` with their `<image>` placeholders, in order across all of them, replaced by
    `images` (one string per image); a PlaceholderMismatch when the counts differ (a chat
    template that drops a placeholder or writes one of its own)."""
    found = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if found != len(images):
        raise PlaceholderMismatch(f"the chat template wrote {found} {IMAGE_PLACEHOLDER} "
                                  f"placeholders for {len(images)} images")
    strings = iter(images)
    out = []
    for text in texts:
        first, *rest = text.split(IMAGE_PLACEHOLDER)
        out.append(first + "".join(next(strings) + piece for piece in rest))
    return out
