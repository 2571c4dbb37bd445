"""Data for tilevlm: the built-in synthetic tile-grid VQA set."""

from tilevlm.data.synthetic import (COLOURS, QUESTION_TYPES, SHAPES, SyntheticSpec, SyntheticVQA,
                                    corpus_texts, make_sample)

__all__ = ["COLOURS", "QUESTION_TYPES", "SHAPES", "SyntheticSpec", "SyntheticVQA",
           "corpus_texts", "make_sample"]
