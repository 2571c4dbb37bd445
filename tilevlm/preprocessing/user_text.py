"""User text stays text: a special token spelled in a message (`<|im_end|>`, `<row_1_col_1>`,
`<|global_image|>`, `<fake_token_around_image>`, `<end_of_utterance>`, ...) is encoded as the
characters it is made of, never as that token, so it cannot forge a turn's end, an image slot or
a grid position. Special tokens come only from the chat template and the image layout.

How: before the chat template renders the messages, each special-token spelling in their text is
replaced by a mark that no text holds (`mark + index + mark`, `mark` a private-use character
absent from the messages and the template). The template's own markers and the images' tokens
are encoded as before (special tokens parsed); each mark is encoded as its spelling's characters
with special tokens not parsed (`Spellings.encode`). Text without any special-token spelling, the
common case, is encoded exactly as before, so token ids stay equal to transformers' processors.
Only the literal `<image>` placeholder keeps its meaning in user text: it places an image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from tilevlm.preprocessing.chat_template import IMAGE_PLACEHOLDER

# Private-use characters: no tokenizer gives them a meaning; the first one absent from every text
# of a conversation is its mark.
_MARKS = tuple(chr(c) for c in range(0xE000, 0xF900))
Encode = Callable[[list[str]], list[list[int]]]


@dataclass(frozen=True)
class Hidden:
    """The spellings taken out of one conversation's text, and the mark that stands for each."""

    mark: str
    spellings: tuple[str, ...]  # spellings[i] is where `mark + str(i) + mark` stands

    def pieces(self, text: str) -> list[tuple[str, bool]]:
        """`text` cut at its marks: (piece, True) for a spelling, (piece, False) for the text
        between them (left out where empty)."""
        parts = re.split(f"{re.escape(self.mark)}(\\d+){re.escape(self.mark)}", text)
        out = [(p, False) for p in parts[0::2]]
        spelled = [(self.spellings[int(i)], True) for i in parts[1::2]]
        merged = [x for pair in zip(out, spelled + [("", False)]) for x in pair]
        return [(p, literal) for p, literal in merged if p]


class Spellings:
    """The special-token spellings of one tokenizer (every special added token, the layout's and
    chat markers), found in text and encoded as text."""

    def __init__(self, tokens: Iterable[str]) -> None:
        found = sorted({t for t in tokens if t and t != IMAGE_PLACEHOLDER}, key=len,
                       reverse=True)  # longest first: one spelling may start another
        self.tokens = tuple(found)
        self._pattern = re.compile("|".join(map(re.escape, found))) if found else None
        self._first = frozenset(t[0] for t in found)

    def spelled_in(self, text: str) -> bool:
        if self._pattern is None or not any(c in text for c in self._first):
            return False
        return self._pattern.search(text) is not None

    def hide(self, messages: Sequence[dict[str, str]], context: str = ""
             ) -> tuple[list[dict[str, str]], Hidden | None]:
        """The messages with every special-token spelling in their content replaced by a mark,
        and what the marks stand for (None, and the messages as given, when no text spells
        one). `context`: other text the mark must not occur in (the chat template)."""
        if not any(self.spelled_in(m["content"]) for m in messages):
            return list(messages), None
        texts = [m["content"] for m in messages] + [context]
        mark = next((c for c in _MARKS if not any(c in t for t in texts)), None)
        if mark is None:  # text holding all 6,400 private-use characters: not a conversation
            raise ValueError("the messages hold every private-use character; cannot tell "
                             "their text from special tokens")
        spellings: list[str] = []

        def replace(match: re.Match) -> str:
            spellings.append(match.group(0))
            return f"{mark}{len(spellings) - 1}{mark}"

        hidden = [{**m, "content": self._pattern.sub(replace, m["content"])} for m in messages]
        return hidden, Hidden(mark, tuple(spellings))

    @staticmethod
    def encode(texts: list[str], hidden: Hidden | None, parsed: Encode, plain: Encode
               ) -> list[list[int]]:
        """Token ids of each text: `parsed` (special tokens parsed) for the text around the
        marks, `plain` (special tokens not parsed) for the spellings the marks stand for."""
        if hidden is None:
            return parsed(texts)
        cut = [hidden.pieces(t) for t in texts]
        runs = [p for pieces in cut for p, literal in pieces if not literal]
        literals = [p for pieces in cut for p, literal in pieces if literal]
        run_ids, literal_ids = iter(parsed(runs)), iter(plain(literals))
        return [[i for _, literal in pieces
                 for i in (next(literal_ids) if literal else next(run_ids))] for pieces in cut]
