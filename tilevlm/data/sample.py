"""A raw sample: what every reader yields and the collator, the Processor and evaluation take.

    {"messages": [{"role": "user" | "assistant", "content": "...<image>..."}, ...],
     "images": [bytes | path | PIL image, ...],   # one per `<image>`, in text order
     "source": "file:row"}                        # where it came from, for error messages

The built-in synthetic samples hold one `image` instead of `images` (and their `qtype`);
`sample_images` reads either form.
"""

from __future__ import annotations

from typing import Any

from tilevlm.data.skips import MALFORMED, PLACEHOLDERS, SkipSample
from tilevlm.preprocessing.chat_template import (
    PlaceholderMismatch,
    check_message,
    place_image_placeholders,
)

Sample = dict[str, Any]


def sample_messages(sample: Sample) -> list[dict[str, str]]:
    return sample["messages"]


def sample_images(sample: Sample) -> list[Any]:
    if "images" in sample:
        return list(sample["images"])
    return [sample["image"]] if sample.get("image") is not None else []


def conversation_sample(messages: list[dict[str, str]], images: list[Any], where: str) -> Sample:
    """A raw sample, checked: roles, string contents, one `<image>` per image.

    Without any `<image>` in the text, the images go at the start of the first user turn.
    """
    for m in messages:
        try:
            check_message(m)
        except ValueError:
            raise SkipSample(MALFORMED, f"bad message {m!r:.120}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipSample(MALFORMED, "no assistant turn (nothing to learn from)")
    try:
        messages = place_image_placeholders(messages, len(images))
    except PlaceholderMismatch as e:
        raise SkipSample(PLACEHOLDERS, str(e)) from None
    except ValueError as e:
        raise SkipSample(MALFORMED, str(e)) from None
    return {"messages": messages, "images": images, "source": where}
