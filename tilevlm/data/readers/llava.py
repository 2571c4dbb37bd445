"""LLaVA-style conversations: a JSON list (or JSON lines) of records plus an image folder.

    {"id": "000001", "image": "coco/train2017/000001.jpg",          # or a list, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Image names are joined to the image root (default: the JSON file's directory) and must stay
inside it: `../../etc/passwd` or an absolute path elsewhere is refused for that sample (counted as
`path_escape`), never opened. A `.json` file is parsed whole (that is what JSON allows); use
`.jsonl` (one record a line) to stream very large sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from tilevlm.data.readers.rows import Keep, RowFormat, RowReader, image_source
from tilevlm.data.sample import Sample, conversation_sample
from tilevlm.data.skips import MALFORMED, SkipCounter, SkipSample
from tilevlm.files import check_regular_file, parse_json, read_json

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system"}


def llava_sample(record: Any, root: Path, where: str) -> Sample:
    """One LLaVA record -> a raw sample (SkipSample when malformed or a path escapes)."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise SkipSample(MALFORMED, "expected an object with a 'conversations' list")
    messages = []
    for turn in record["conversations"]:
        role = turn.get("from") if isinstance(turn, dict) else None
        role = ROLE_NAMES.get(role) if isinstance(role, str) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise SkipSample(MALFORMED, f"a turn needs 'from' (human|gpt|system) and a 'value' "
                                        f"string, got {turn!r:.120}")
        messages.append({"role": role, "content": turn["value"]})
    names = record.get("image")
    names = [] if names is None else names if isinstance(names, list) else [names]
    return conversation_sample(messages, [image_source(n, root) for n in names], where)


class LlavaReader(RowReader):
    """Raw samples from LLaVA `.json` / `.jsonl` files (in the order given), this shard only."""

    def __init__(self, files: Sequence[str | Path], image_root: str | Path | None = None,
                 rank: int = 0, world_size: int = 1, skips: SkipCounter | None = None,
                 row_format: RowFormat | None = None) -> None:
        super().__init__(rank, world_size, skips)
        self.row_format = row_format  # other records than LLaVA's (checked row by row)
        if not files:
            raise ValueError("no LLaVA json files given")
        self.files = [Path(f) for f in files]
        for path in self.files:
            check_regular_file(path)
        self.image_root = Path(image_root) if image_root is not None else self.files[0].parent

    def _rows(self, keep: Keep) -> Iterator[tuple[str, Any]]:
        first = 0
        for path in self.files:
            records = _jsonl_lines(path) if path.suffix == ".jsonl" else _json_records(path)
            n = 0
            for n, record in enumerate(records, start=1):
                if keep(first + n - 1):
                    yield f"{path}:{n - 1}", record
            first += n

    def _to_sample(self, row: Any, where: str) -> Sample:
        if isinstance(row, str):  # a JSON line, parsed only by the rank that keeps it
            try:
                row = parse_json(row, "line")
            except ValueError as e:
                raise SkipSample(MALFORMED, str(e)) from None
        if self.row_format is not None:
            if not isinstance(row, dict):
                raise SkipSample(MALFORMED, f"expected a JSON object, got {row!r:.80}")
            return self.row_format.to_sample(row, self.image_root, where)
        return llava_sample(row, self.image_root, where)


def _json_records(path: Path) -> list[Any]:
    return read_json(path, list, "a JSON list of LLaVA {image, conversations} records")


def _jsonl_lines(path: Path) -> Iterator[str]:
    """The non-blank lines of a JSON-lines file, streamed (a line that does not parse is skipped
    and counted later, so one bad line never stops a run)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        yield from (line for line in f if line.strip())
