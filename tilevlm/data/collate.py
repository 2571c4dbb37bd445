"""From raw samples to model batches, skipping (and counting) bad samples instead of crashing.

A raw sample (`tilevlm.data.sample`) holds `messages` (chat turns, `<image>` placeholders in the
text) and `image` or `images`; an image is anything `load_image` takes (a path, bytes, a PIL
image). A sample is bad when reading it raises, when an image does not load, or when it is
longer than `lm_max_length`: it is logged, dropped and counted in the batch's `skipped`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from tilevlm.data.batch import OTHER, TrainBatch
from tilevlm.data.sample import Sample, sample_images, sample_messages

log = logging.getLogger(__name__)

# What the processor raises for a sample it cannot use (bad image, too long, malformed).
BAD_SAMPLE_ERRORS = (ValueError, KeyError, TypeError)


class SkipBadSamples:
    """A map-style dataset wrapper: `ds[i]` is the sample, or None when reading it raised."""

    def __init__(self, dataset: Sequence[Sample]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample | None:
        try:
            return self.dataset[index]
        except (IndexError, KeyboardInterrupt):
            raise
        except Exception as e:  # a reader error of any kind: skip the sample, never crash
            log.warning("skipping sample %d: %s: %s", index, type(e).__name__, e)
            return None


class VLMCollator:
    """`collate_fn` for a DataLoader: a list of raw samples (None = already bad) -> a Processor
    batch whose `skipped` counts the bad ones; `empty` when every sample was bad."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, samples: list[Sample | None]) -> TrainBatch:
        good = [s for s in samples if s is not None]
        try:
            out = self._process(good) if good else None
        except BAD_SAMPLE_ERRORS:  # find the bad ones; the rest still make a batch
            good = [s for s in good if self._usable(s)]
            out = self._process(good) if good else None
        n_bad = len(samples) - len(good)
        skipped = {OTHER: n_bad} if n_bad else {}
        return TrainBatch(skipped=skipped) if out is None else TrainBatch.of(out, skipped=skipped)

    def _process(self, samples: list[Sample]) -> dict[str, Any]:
        return self.processor([sample_messages(s) for s in samples],
                              [sample_images(s) for s in samples])

    def _usable(self, sample: Sample) -> bool:
        try:
            self._process([sample])
        except BAD_SAMPLE_ERRORS as e:
            log.warning("skipping a sample: %s", e)
            return False
        return True
