"""SwiGLU and rotary kernels against their references and transformers' modules, on the CPU interpreter."""

import pytest
import torch

from slmkit.kernels._launch import HAVE_TRITON, use_triton
from slmkit.kernels.rotary import rotary, rotary_ref
from slmkit.kernels.swiglu import swiglu, swiglu_ref

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
CASES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_the_kernel_path_runs_in_these_tests():
    assert use_triton(torch.zeros(1))  # tests/conftest.py sets TRITON_INTERPRET=1 before triton loads


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True), ("3.2.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
    ("3.9.0", "3.0.0", False), ("4.0.0", "2.4.6", False), ("3.6.0+git1a2b", "2.4.0rc1", True)])
def test_interpreter_problem_names_the_broken_triton_numpy_pairs(triton_version, numpy_version, broken):
    from slmkit.kernels._launch import interpreter_problem

    problem = interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:  # measured: triton 3.6.0 + numpy 2.4.6 fails every looping kernel; with numpy 2.3.5 all pass
        assert problem == (f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) cannot run with NumPy "
                           f"{numpy_version}: install triton>=3.7 or numpy<2.4")


@pytest.mark.parametrize("dtype, atol, rtol", CASES)
@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 96), (2049,)])
def test_swiglu_matches_reference(shape, dtype, atol, rtol):
    gate, up = _randn(*shape, seed=1, dtype=dtype), _randn(*shape, seed=2, dtype=dtype)
    torch.testing.assert_close(swiglu(gate, up), swiglu_ref(gate, up), atol=atol, rtol=rtol)


def test_swiglu_is_llama_mlp_activation():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48)).eval()
    x = _randn(2, 5, 32)
    with torch.no_grad():
        ours = mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
        torch.testing.assert_close(ours, mlp(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        swiglu(x, x[..., :-1])


@pytest.mark.parametrize("dtype, atol, rtol", CASES)
@pytest.mark.parametrize("batch, heads, positions, dim", [(1, 3, 5, 64), (2, 4, 7, 128), (3, 1, 1, 10)])
def test_rotary_matches_reference(batch, heads, positions, dim, dtype, atol, rtol):
    x = _randn(batch, heads, positions, dim, dtype=dtype)
    angles = _randn(batch, positions, dim // 2, seed=3)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    torch.testing.assert_close(rotary(x, cos, sin), rotary_ref(x, cos, sin), atol=atol, rtol=rtol)
    transposed = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, T, D) view of a (B, T, H, D) buffer
    torch.testing.assert_close(rotary(transposed, cos, sin), rotary_ref(x, cos, sin), atol=atol, rtol=rtol)


def test_rotary_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=10000.0)
    q, k = _randn(2, 4, 9, 64, seed=1), _randn(2, 4, 9, 64, seed=2)
    positions = torch.arange(9)[None].expand(2, -1) + torch.tensor([[0], [5]])
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(rotary(q, cos, sin), q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotary(k, cos, sin), k_hf, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="even D"):
        rotary(q[..., :63], cos, sin)
