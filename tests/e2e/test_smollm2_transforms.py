"""Architecture transforms on the real SmolLM2-135M-Instruct: the parameter counts the note reports, the
schedule at a budget, reloading through transformers, and the engine's greedy tokens on the result."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import slmkit
from slmkit.engine import Engine, SamplingParams
from slmkit.eval.report import parameter_count
from slmkit.models.checkpoint import WEIGHTS

pytestmark = pytest.mark.e2e
FFN_PARAMS = 3 * 576 * 1536  # gate, up and down of one SmolLM2 block


def _hf_greedy(model, ids, max_new_tokens):
    output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                            temperature=None, top_p=None, top_k=None, pad_token_id=model.config.eos_token_id)
    return output[0, len(ids):].tolist()


def test_shared_ffn_pairs_halve_the_ffns_and_run_in_the_engine(reference, calib, tmp_path):
    model = copy.deepcopy(reference)
    slmkit.transform(model, slmkit.SharedFFNConfig(group_size=2, init="important", rank=8), calib=calib)
    corrections = 30 * 3 * 8 * (576 + 1536)  # blocks × projections × rank × (in + out)
    assert parameter_count(model) == parameter_count(reference) - 15 * FFN_PARAMS + corrections
    path = slmkit.save(model, tmp_path / "shared")
    assert (path / WEIGHTS).stat().st_size < 0.75 * parameter_count(reference) * 4
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = calib[:1, :64]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    engine = Engine(model, max_batch_size=2, max_model_len=256)
    prompt = calib[0, :40].tolist()
    out = engine.generate([prompt], SamplingParams(max_tokens=24), progress=False)[0]
    assert out.token_ids == _hf_greedy(model, prompt, 24)


def test_openelm_schedule_at_a_budget(reference, calib, tmp_path):
    model = copy.deepcopy(reference)
    config = slmkit.LayerwiseScalingConfig(alpha_min=0.5, alpha_max=1.0, beta_min=0.5, beta_max=4.0, param_budget=0.75)
    slmkit.transform(model, config, calib=calib)
    total = parameter_count(reference)
    assert 0.73 * total < parameter_count(model) <= 0.75 * total
    heads, ffn = model.config.layer_num_heads, model.config.layer_intermediate_sizes
    assert heads[0] == 6 and heads[-1] == 9 and all(h % 3 == 0 for h in heads)
    assert ffn == sorted(ffn) and ffn[-1] <= 1536 and all(w % 64 == 0 for w in ffn)
    report = slmkit.evaluate(model, reference=reference, config=slmkit.EvalConfig(max_tokens=2048, seq_len=512))
    assert report.perplexity < 20 * report.reference_perplexity  # damaged before healing, but a language model
    path = slmkit.save(model, tmp_path / "openelm")
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib[:1, :64]).logits, model(calib[:1, :64]).logits)
