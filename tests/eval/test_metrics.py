import math

import torch
import torch.nn.functional as F

from slmkit.eval import metrics


def test_kl_matches_torch_and_is_zero_on_itself():
    torch.manual_seed(0)
    ref, other = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    kl = metrics.token_kl(ref, other)
    expected = F.kl_div(F.log_softmax(other, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected)
    assert metrics.token_kl(ref, ref).abs().max() < 1e-6


def test_nll_and_perplexity_of_uniform_model():
    vocab = 37
    logits = torch.zeros(1, 6, vocab)
    tokens = torch.randint(0, vocab, (1, 6))
    nll = metrics.token_nll(logits, tokens)
    assert nll.shape == (1, 5)
    assert math.isclose(metrics.perplexity(nll.sum().item(), nll.numel()), vocab, rel_tol=1e-5)


def test_top1_agreement():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[2.0, 0.0], [3.0, 1.0]]])
    assert metrics.top1_agreement(a, b).tolist() == [[True, False]]
