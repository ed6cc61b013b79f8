"""Sampling math against transformers' logits processors, and the params' validation."""

import pytest
import torch

from slmkit.config import ConfigError
from slmkit.engine.sampling import (SamplingParams, apply_repetition_penalty, sample_tokens,
                                    top_k_top_p_filter)


def _logits(rows=3, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_k_and_top_p_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = _logits()
    for k, p in ((5, 1.0), (0, 0.8), (10, 0.5), (1, 0.9)):
        ours = top_k_top_p_filter(logits, torch.full((3,), k), torch.full((3,), p))
        expected = logits.clone()
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.equal(ours.isinf(), expected.isinf()), (k, p)
        assert torch.equal(ours[~ours.isinf()], logits[~ours.isinf()])


def test_per_row_settings_and_the_top_token_always_stays():
    logits = _logits()
    out = top_k_top_p_filter(logits, torch.tensor([1, 0, 3]), torch.tensor([1.0, 1e-6, 1.0]))
    assert (~out.isinf()).sum(dim=1).tolist() == [1, 1, 3]
    assert torch.equal(out.argmax(dim=1), logits.argmax(dim=1))


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = _logits(rows=1)
    seen_ids = torch.tensor([[3, 7, 7, 20]])
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[0, seen_ids[0]] = True
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, torch.tensor([1.3])), expected)


def test_sampling_follows_each_rows_generator_and_greedy_rows_take_the_argmax():
    logits = _logits()
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5)]

    def draw(seed):
        generators = [None, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        return sample_tokens(logits, params, generators)

    assert torch.equal(draw(1), draw(1))
    assert int(draw(1)[0]) == int(logits[0].argmax())
    assert int(draw(1)[2]) in logits[2].topk(5).indices.tolist()
    assert len({tuple(draw(s).tolist()) for s in range(8)}) > 1


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(repetition_penalty=0), dict(stop=[""]),
                                 # wrong types: each was a TypeError mid-check or accepted as is
                                 dict(stop=5), dict(stop=["a", 3]), dict(seed="a"), dict(temperature="hot"),
                                 dict(max_tokens=2.5), dict(top_k=True), dict(stop_token_ids=[1.0]),
                                 dict(ignore_eos="yes")])
def test_bad_params_fail_naming_the_field(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_a_single_stop_string_is_a_list():
    assert SamplingParams(stop="\n").stop == ["\n"]


def test_numbers_and_stop_forms_that_are_fine():
    params = SamplingParams(temperature=1, top_p=1, stop=("a", "b"), stop_token_ids=(7,), seed=3)
    assert params.stop == ["a", "b"] and params.temperature == 1
