"""End-to-end distillation on the real SmolLM2-135M-Instruct: a pruned student moves toward the original."""

import copy

import pytest

import slmkit
from slmkit.data import token_blocks
from slmkit.models.checkpoint import read_manifest

pytestmark = pytest.mark.e2e


def test_distillation_heals_a_width_pruned_smollm2(reference, calib, tmp_path):
    student = copy.deepcopy(reference)
    slmkit.prune(student, slmkit.WidthPruneConfig(ffn=0.25), calib=calib)
    eval_data = token_blocks(reference.slmkit.tokenizer, slmkit.EvalConfig(max_tokens=1024, seq_len=256).data_config())
    config = slmkit.DistillConfig(steps=6, batch_size=4, micro_batch_size=4, learning_rate=2e-4, warmup_steps=1,
                                  eval_every=6, save_every=3)
    slmkit.distill(student, reference, config, data=calib[:, :128].contiguous(), eval_data=eval_data,
                   output_dir=tmp_path / "run")
    first, last = student.slmkit.metrics["distill"]["evals"]
    assert last["kl"] < 0.9 * first["kl"] and last["perplexity"] < first["perplexity"], (first, last)
    assert last["top1_agreement"] > first["top1_agreement"]
    path = slmkit.save(student, tmp_path / "healed")
    reloaded = slmkit.load_model(path)
    assert reloaded.config.intermediate_size == student.config.intermediate_size
    assert read_manifest(path)["metrics"]["distill"]["steps"] == 6
