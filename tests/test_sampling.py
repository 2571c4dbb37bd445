import pytest
import torch

from tilevlm.inference.sampling import (
    SamplingParams,
    StopStrings,
    apply_repetition_penalty,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert sample_next_token(logits, SamplingParams()).tolist() == [1, 0]


def test_top_k_keeps_only_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isinf(out).tolist() == [[True, False, False, True]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_p_filter(probs.log(), 0.75)
    # 0.5 alone < 0.75; 0.5 + 0.3 reaches it: the first two stay.
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    # The top token always survives, however small p is.
    assert torch.isfinite(top_p_filter(probs.log(), 1e-6)).sum() == 1


def test_top_p_works_on_unsorted_rows():
    logits = torch.tensor([[0.0, 10.0, 9.0, -5.0]])
    keep = torch.isfinite(top_p_filter(logits, 0.9))
    assert keep.tolist() == [[False, True, True, False]]


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0]]
    assert sample_next_token(logits, SamplingParams(repetition_penalty=2.0), seen).item() == 2


def test_sampling_is_reproducible_with_a_seed_and_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(4000, 1)
    params = SamplingParams(temperature=1.0)
    a = sample_next_token(logits, params, generator=torch.Generator().manual_seed(7))
    b = sample_next_token(logits, params, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=4).float() / len(a)
    expected = logits[0].softmax(-1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_top_k_one_with_temperature_is_greedy():
    logits = torch.randn(8, 50)
    out = sample_next_token(logits, SamplingParams(temperature=1.5, top_k=1))
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(repetition_penalty=0)])
def test_bad_sampling_params_are_errors(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_strings_find_and_holdback():
    stops = StopStrings(["###", "\nUser:"])
    assert stops.find("hello ### world") == 6
    assert stops.find("hello") == -1
    assert stops.holdback("hello #") == 1
    assert stops.holdback("hello ##") == 2
    assert stops.holdback("hello\nUs") == 3
    assert stops.holdback("hello") == 0
    assert not StopStrings(None)
