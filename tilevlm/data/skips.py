"""Counting the samples a data pipeline drops, by reason, instead of crashing or truncating.

Every stage (readers, the length filter, the packer) raises `SkipSample` for a sample it cannot
use and adds it to one shared `SkipCounter`; the counts travel with the batches (`drain`), so they
reach the training process even from DataLoader workers.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)

# The reasons used in tilevlm; a stage may add its own.
MALFORMED = "malformed"  # a row without the expected fields or structure
PATH_ESCAPE = "path_escape"  # an image path outside the image root
IMAGE_ERROR = "image_error"  # an image that does not open or decode
TOO_LONG = "too_long"  # more tokens than lm_max_length (never truncated)
TOO_MANY_TILES = "too_many_tiles"  # more tiles than one micro-batch may hold
PLACEHOLDERS = "placeholder_mismatch"  # `<image>` count differs from the number of images


class SkipSample(ValueError):
    """A sample that cannot be used; `reason` is the counter key, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SkipCounter:
    """Dropped samples per reason. `counts` is the running total; `drain()` returns and clears
    what was added since the last drain (for per-batch reporting)."""

    def __init__(self, log_first: int = 5) -> None:
        self.counts: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._log_first = log_first  # warn for the first few of each reason, then stay quiet

    def add(self, reason: str, where: str = "", message: str = "") -> None:
        self.counts[reason] += 1
        self._pending[reason] += 1
        if self.counts[reason] <= self._log_first:
            log.warning("skipping %s (%s): %s", where or "a sample", reason,
                        " ".join(message.split()))  # one line, whatever the message holds

    def skip(self, error: SkipSample, where: str = "") -> None:
        self.add(error.reason, where, str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def drain(self) -> dict[str, int]:
        pending, self._pending = dict(self._pending), Counter()
        return pending

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self.counts)})"
