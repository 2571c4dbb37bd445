import re

import numpy as np
import pytest

from tilevlm.data.synthetic import COLOURS, QUESTION_TYPES, SHAPES, SyntheticSpec, SyntheticVQA, corpus_texts
from tilevlm.data.synthetic import IMAGE_PLACEHOLDER, SPLIT_CODES, TileObject, synthetic_sample

CELL = re.compile(r"row (\d+), column (\d+)")


def nearest_colour(pixel: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: np.linalg.norm(np.asarray(COLOURS[name]) - pixel))


def centre(obj: TileObject) -> tuple[int, int]:
    """The (x, y) pixel at the middle of the object's box."""
    x0, y0, x1, y1 = obj.box
    return (x0 + x1) // 2, (y0 + y1) // 2


def test_deterministic_per_split_and_index():
    a, b = synthetic_sample("train", 17), synthetic_sample("train", 17)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert (a["question"], a["answer"], a["grid"], a["objects"]) == \
        (b["question"], b["answer"], b["grid"], b["objects"])


def test_resume_matches_full_iteration():
    ds = SyntheticVQA("validation", 12)
    full = [s["question"] + s["answer"] for s in ds]
    resumed = [s["question"] + s["answer"] for s in ds.iter_from(7)]
    assert resumed == full[7:]
    assert ds[-1]["index"] == 11
    with pytest.raises(IndexError):
        ds[12]


def test_splits_are_disjoint():
    fingerprints = {}
    for split in SPLIT_CODES:
        for i in range(60):
            key = np.asarray(synthetic_sample(split, i)["image"]).tobytes()
            assert key not in fingerprints, f"{split}[{i}] equals {fingerprints[key]}"
            fingerprints[key] = (split, i)


def test_seed_changes_the_data():
    a = synthetic_sample("train", 3, SyntheticSpec(seed=0))
    b = synthetic_sample("train", 3, SyntheticSpec(seed=1))
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


@pytest.mark.parametrize("tile", [16, 32, 64])
def test_image_is_tile_multiple_and_grid_in_range(tile):
    for i in range(30):
        s = synthetic_sample("train", i, SyntheticSpec(tile_size=tile))
        n_h, n_w = s["grid"]
        assert 1 <= n_h <= 3 and 1 <= n_w <= 3
        assert s["image"].size == (n_w * tile, n_h * tile)
        assert s["image"].mode == "RGB"
        assert len(s["objects"]) == n_h * n_w


def test_objects_drawn_inside_their_tile_with_their_colour():
    spec = SyntheticSpec(tile_size=32)
    for i in range(40):
        s = synthetic_sample("test", i, spec)
        pixels = np.asarray(s["image"]).astype(int)
        for obj in s["objects"]:
            x0, y0, x1, y1 = obj.box
            t = spec.tile_size
            assert (obj.col - 1) * t <= x0 < x1 < obj.col * t
            assert (obj.row - 1) * t <= y0 < y1 < obj.row * t
            cx, cy = centre(obj)
            assert nearest_colour(pixels[cy, cx]) == obj.colour
            assert obj.shape in SHAPES


def test_answers_match_the_drawn_content():
    spec = SyntheticSpec(questions_per_image=6)
    for i in range(80):
        s = synthetic_sample("train", i, spec)
        pixels = np.asarray(s["image"]).astype(int)
        cells = {(o.row, o.col): o for o in s["objects"]}
        n_h, n_w = s["grid"]
        for question, answer, qtype in s["turns"]:
            if qtype in ("colour", "shape"):
                obj = cells[tuple(int(v) for v in CELL.search(question).groups())]
                if qtype == "colour":
                    cx, cy = centre(obj)
                    assert answer == obj.colour == nearest_colour(pixels[cy, cx])
                else:
                    assert answer == obj.shape
            elif qtype == "rows":
                assert answer == str(n_h)
            elif qtype == "columns":
                assert answer == str(n_w)
            else:
                colour, shape = re.match(r"Where is the (\w+) (\w+)\?", question).groups()
                matches = [o for o in s["objects"] if (o.colour, o.shape) == (colour, shape)]
                assert len(matches) == 1, "where questions are only asked when unique"
                assert answer == f"row {matches[0].row}, column {matches[0].col}"


def test_all_question_types_present_and_weights_respected():
    qtypes = [synthetic_sample("train", i)["qtype"] for i in range(300)]
    assert set(qtypes) == set(QUESTION_TYPES)
    only_colour = SyntheticSpec(qtype_weights=(1, 0, 0, 0, 0))
    assert {synthetic_sample("train", i, only_colour)["qtype"] for i in range(30)} == {"colour"}


def test_conversation_form():
    s = synthetic_sample("train", 5, SyntheticSpec(questions_per_image=3))
    msgs = s["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert msgs[0]["content"] == IMAGE_PLACEHOLDER + s["question"]
    assert msgs[1]["content"] == s["answer"]
    assert all(IMAGE_PLACEHOLDER not in m["content"] for m in msgs[1:])


def test_corpus_covers_every_question_and_answer():
    corpus = set(corpus_texts(max_grid=3))
    for i in range(100):
        for question, answer, _ in synthetic_sample("train", i, SyntheticSpec(questions_per_image=4))["turns"]:
            assert question in corpus
            assert answer in corpus
    assert any(ch.isdigit() for text in corpus for ch in text)


@pytest.mark.parametrize("bad", [dict(tile_size=4), dict(max_grid=0), dict(qtype_weights=(1, 0)),
                                 dict(qtype_weights=(0, 0, 0, 0, 0)), dict(questions_per_image=0)])
def test_bad_spec_is_refused(bad):
    with pytest.raises(ValueError):
        SyntheticSpec(**bad)


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        synthetic_sample("dev", 0)


def test_multi_turn_never_leaks_an_answer():
    spec = SyntheticSpec(questions_per_image=8, qtype_weights=(1, 1, 1, 1, 1))
    for i in range(60):
        s = synthetic_sample("train", i, spec)
        questions = [q for q, _, _ in s["turns"]]
        assert len(questions) == len(set(questions)), "no question is asked twice"
        cells = []
        for question, answer, qtype in s["turns"]:
            text = answer if qtype == "where" else question
            match = CELL.search(text)
            if match:
                cells.append(match.groups())
        assert len(cells) == len(set(cells)), "each cell is the subject of one question at most"
        assert 1 <= len(s["turns"]) <= 8


def test_single_tile_frac_controls_the_grid_mix():
    grids = [synthetic_sample("train", i, SyntheticSpec(single_tile_frac=0.5))["grid"] for i in range(400)]
    share = sum(g == (1, 1) for g in grids) / len(grids)
    assert 0.4 < share < 0.6
    assert {g for g in grids if g != (1, 1)} == {(h, w) for h in (1, 2, 3) for w in (1, 2, 3)} - {(1, 1)}
    assert all(synthetic_sample("train", i, SyntheticSpec(single_tile_frac=0.0))["grid"] != (1, 1)
               for i in range(50))


def test_extra_question_types_answer_by_content():
    spec = SyntheticSpec(questions_per_image=4, qtype_weights=(0, 0, 0, 0, 1),
                         extra_qtypes=(("colour_of", 1), ("shape_of", 1), ("count", 1),
                                       ("exists", 1), ("where_colour", 1)))
    seen = set()
    for i in range(120):
        s = synthetic_sample("train", i, spec)
        objs = s["objects"]
        for question, answer, qtype in s["turns"]:
            seen.add(qtype)
            if qtype == "colour_of":
                shape = re.match(r"What colour is the (\w+)\?", question).group(1)
                matches = [o for o in objs if o.shape == shape]
                assert len(matches) == 1 and answer == matches[0].colour
            elif qtype == "shape_of":
                colour = re.match(r"Which shape is (\w+)\?", question).group(1)
                matches = [o for o in objs if o.colour == colour]
                assert len(matches) == 1 and answer == matches[0].shape
            elif qtype == "where_colour":
                colour = re.match(r"Where is the (\w+) shape\?", question).group(1)
                matches = [o for o in objs if o.colour == colour]
                assert len(matches) == 1
                assert answer == f"row {matches[0].row}, column {matches[0].col}"
            elif qtype == "count":
                colour = re.match(r"How many (\w+) shapes are there\?", question).group(1)
                assert answer == str(sum(o.colour == colour for o in objs))
            elif qtype == "exists":
                colour, shape = re.match(r"Is there a (\w+) (\w+)\?", question).groups()
                present = any((o.colour, o.shape) == (colour, shape) for o in objs)
                assert answer == ("yes" if present else "no")
    assert seen >= {"colour_of", "shape_of", "count", "exists", "where", "where_colour"}
    corpus = set(corpus_texts(max_grid=3))  # the five standard types only (its docstring)
    for i in range(60):
        for question, answer, qtype in synthetic_sample("train", i, spec)["turns"]:
            assert (question in corpus and answer in corpus) == (qtype in QUESTION_TYPES)


def test_defaults_unchanged_by_the_extra_options():
    """The test split's default mix asks only the five original types, as before."""
    assert {synthetic_sample("test", i)["qtype"] for i in range(200)} <= set(QUESTION_TYPES)
    with pytest.raises(ValueError, match="extra_qtypes"):
        SyntheticSpec(extra_qtypes=(("where", 1.0),))


def test_pair_grid_frac_controls_two_tile_grids():
    spec = SyntheticSpec(single_tile_frac=0.2, pair_grid_frac=0.4)
    grids = [synthetic_sample("train", i, spec)["grid"] for i in range(500)]
    pairs = sum(g in ((1, 2), (2, 1)) for g in grids) / len(grids)
    singles = sum(g == (1, 1) for g in grids) / len(grids)
    assert 0.32 < pairs < 0.48 and 0.13 < singles < 0.27
    assert {g for g in grids} == {(h, w) for h in (1, 2, 3) for w in (1, 2, 3)}
    with pytest.raises(ValueError, match="pair_grid_frac"):
        SyntheticSpec(single_tile_frac=0.7, pair_grid_frac=0.5)


def test_later_mix_applies_from_its_index_on():
    """A curriculum by position: the images stay the same, the question types follow the later
    weights from `later_from` on."""
    base = SyntheticSpec()
    spec = SyntheticSpec(later_qtype_weights=(0, 0, 0, 0, 1), later_from=100)
    early = [synthetic_sample("train", i, spec) for i in range(100)]
    late = [synthetic_sample("train", i, spec) for i in range(100, 200)]
    assert [s["question"] for s in early] == [synthetic_sample("train", i, base)["question"]
                                              for i in range(100)]
    assert {s["qtype"] for s in early} == set(QUESTION_TYPES)
    # `where` unless no colour+shape pair in the image is unique (then another type)
    assert sum(s["qtype"] == "where" for s in late) >= 95
    for i, s in zip(range(100, 200), late):
        assert np.array_equal(np.asarray(s["image"]), np.asarray(synthetic_sample("train", i, base)["image"]))
    with pytest.raises(ValueError, match="later_qtype_weights"):
        SyntheticSpec(later_qtype_weights=(1, 0))
    with pytest.raises(ValueError, match="later_from"):
        SyntheticSpec(later_qtype_weights=(1, 0, 0, 0, 0), later_from=-1)
