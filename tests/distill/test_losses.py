"""The distillation losses against their definitions, the eval metrics and autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slmkit.distill import losses
from slmkit.eval import metrics


def _logits(seed: int, shape=(2, 5, 37)) -> torch.Tensor:
    return 3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _log_probs(seed: int) -> torch.Tensor:
    return F.log_softmax(_logits(seed), dim=-1)


def test_forward_kl_matches_eval_metric_and_torch():
    teacher, student = _logits(0), _logits(1)
    ours = losses.forward_kl(F.log_softmax(teacher, -1), F.log_softmax(student, -1))
    torch.testing.assert_close(ours, metrics.token_kl(teacher, student).double(), rtol=1e-5, atol=1e-6)
    reference = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ours, reference)


def test_reverse_kl_swaps_arguments():
    p, q = _log_probs(0), _log_probs(1)
    torch.testing.assert_close(losses.reverse_kl(p, q), losses.forward_kl(q, p))
    assert not torch.allclose(losses.reverse_kl(p, q), losses.forward_kl(p, q))


@pytest.mark.parametrize("name", losses.LOSSES)
def test_divergences_are_zero_only_for_equal_distributions(name):
    p, q = _log_probs(0), _log_probs(1)
    same = losses.divergence(name, p, p, beta=0.3, skew=0.2)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-12, rtol=0)
    assert (losses.divergence(name, p, q, beta=0.3, skew=0.2) > 1e-3).all()


def test_jsd_is_symmetric_at_half_and_bounded_by_log2():
    p, q = _log_probs(0), _log_probs(1)
    jsd = losses.generalized_jsd(p, q, 0.5)
    torch.testing.assert_close(jsd, losses.generalized_jsd(q, p, 0.5))
    assert (jsd <= math.log(2) + 1e-12).all()
    m = torch.log(0.5 * p.exp() + 0.5 * q.exp())  # the definition, directly
    torch.testing.assert_close(jsd, 0.5 * losses.kl_divergence(p, m) + 0.5 * losses.kl_divergence(q, m))


def test_skew_kls_follow_their_definition_and_tend_to_kl():
    p, q = _log_probs(0), _log_probs(1)
    alpha = 0.1
    mixed = torch.log(alpha * p.exp() + (1 - alpha) * q.exp())
    torch.testing.assert_close(losses.skew_kl(p, q, alpha), losses.kl_divergence(p, mixed))
    mixed_reverse = torch.log(alpha * q.exp() + (1 - alpha) * p.exp())
    torch.testing.assert_close(losses.skew_reverse_kl(p, q, alpha), losses.kl_divergence(q, mixed_reverse))
    # alpha → 0 recovers forward / reverse KL
    torch.testing.assert_close(losses.skew_kl(p, q, 1e-9), losses.forward_kl(p, q), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(losses.skew_reverse_kl(p, q, 1e-9), losses.reverse_kl(p, q), rtol=1e-3, atol=1e-6)


def test_zero_probability_terms_count_as_zero():
    log_p = torch.tensor([[0.0, -float("inf")]])  # p = (1, 0)
    log_q = torch.log(torch.tensor([[0.5, 0.5]]))
    assert losses.forward_kl(log_p, log_q).item() == pytest.approx(math.log(2))


def test_forward_kl_gradient_is_student_minus_teacher_probabilities():
    teacher, student = _logits(0), _logits(1).requires_grad_(True)
    mask = torch.ones(student.shape[:2], dtype=torch.bool)
    teacher_log_probs, _ = losses.teacher_targets(teacher)
    loss = losses.logit_distillation_loss(student, teacher_log_probs, mask)
    loss.backward()
    positions = mask.sum()
    expected = (F.softmax(student.detach(), -1) - F.softmax(teacher, -1)) / positions
    torch.testing.assert_close(student.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_temperature_softens_both_and_scales_by_its_square():
    teacher, student = _logits(0), _logits(1)
    mask = torch.ones(student.shape[:2], dtype=torch.bool)
    temperature = 2.5
    teacher_log_probs, _ = losses.teacher_targets(teacher, temperature)
    loss = losses.logit_distillation_loss(student, teacher_log_probs, mask, temperature=temperature)
    expected = losses.forward_kl(F.log_softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1))
    assert loss.item() == pytest.approx(expected.mean().item() * temperature**2, rel=1e-5)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_top_k_with_the_whole_vocabulary_equals_the_full_loss(name):
    teacher, student = _logits(0), _logits(1)
    mask = torch.ones(student.shape[:2], dtype=torch.bool)
    full = losses.logit_distillation_loss(student, losses.teacher_targets(teacher)[0], mask, name)
    top, indices = losses.teacher_targets(teacher, top_k=teacher.shape[-1])
    bucketed = losses.logit_distillation_loss(student, top, mask, name, top_indices=indices)
    assert bucketed.item() == pytest.approx(full.item(), rel=1e-4)


def test_top_k_buckets_are_distributions_and_never_exceed_the_full_kl():
    teacher, student = _logits(0), _logits(1)
    top, indices = losses.teacher_targets(teacher, top_k=5)
    assert top.shape == (2, 5, 5) and indices.shape == (2, 5, 5)
    teacher_buckets, student_buckets = losses.bucketed_log_probs(top, indices, F.log_softmax(student, -1))
    assert teacher_buckets.shape[-1] == 6
    torch.testing.assert_close(teacher_buckets.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
    torch.testing.assert_close(student_buckets.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
    coarse = losses.forward_kl(teacher_buckets, student_buckets)
    full = losses.forward_kl(F.log_softmax(teacher, -1), F.log_softmax(student, -1))
    assert (coarse <= full + 1e-9).all() and (coarse > 0).all()


def test_mask_selects_positions():
    teacher, student = _logits(0), _logits(1)
    mask = torch.zeros(student.shape[:2], dtype=torch.bool)
    mask[0, 2] = True
    loss = losses.logit_distillation_loss(student, losses.teacher_targets(teacher)[0], mask)
    expected = losses.forward_kl(F.log_softmax(teacher[0, 2], -1), F.log_softmax(student[0, 2], -1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cross_entropy_matches_torch():
    logits, tokens = _logits(0), torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 5, dtype=torch.bool)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 37), tokens[:, 1:].reshape(-1))
    assert losses.next_token_cross_entropy(logits, tokens, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_hidden_state_loss_is_scale_free_and_zero_when_equal():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 8, generator=generator), torch.randn(2, 4, 8, generator=generator)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert losses.hidden_state_loss(teacher, teacher, mask).item() == 0
    base = losses.hidden_state_loss(student, teacher, mask).item()
    assert base > 0
    assert losses.hidden_state_loss(100 * student, 100 * teacher, mask).item() == pytest.approx(base, rel=1e-5)


def test_uniform_layer_pairs():
    assert losses.uniform_layer_pairs(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    pairs = losses.uniform_layer_pairs(24, 30)
    assert pairs[-1] == (23, 29) and len(pairs) == 24
    assert all(b >= a for (_, a), (_, b) in zip(pairs, pairs[1:]))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_forward_kl_matches_autograd_with_mask_and_temperature(temperature):
    teacher = _logits(0).float()
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    teacher_log_probs, _ = losses.teacher_targets(teacher, temperature)
    fused_input = _logits(1).float().requires_grad_(True)
    fused = losses.logit_distillation_loss(fused_input, teacher_log_probs, mask, temperature=temperature)
    fused.backward()
    plain_input = _logits(1).float().requires_grad_(True)
    per_position = losses.forward_kl(teacher_log_probs, F.log_softmax(plain_input / temperature, -1))
    plain = losses.masked_mean(per_position, mask) * temperature**2
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(fused_input.grad, plain_input.grad, rtol=1e-4, atol=1e-7)
