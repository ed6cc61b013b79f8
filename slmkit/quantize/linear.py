"""Quantized linear modules: W8A8Linear (int8 weights and activations) and WeightOnlyLinear (int8 or
packed int4 weights, float activations), plus the int8 activation math W8A8 uses.

Symmetric int8 everywhere: ``q = clamp(round(x / scale), -127, 127)`` with ``scale = max|x| / 127``.
Weights: one scale per output channel. Activations: one scale per token (dynamic, computed at run time)
or one per tensor (static, from calibration). The matmul runs int8 × int8 → int32 and is rescaled by
``act_scale * weight_scale`` (SmoothQuant, Xiao et al. 2023, §3 "W8A8 quantization").
"""

from __future__ import annotations

import torch
from torch import nn

from slmkit.kernels.w8a8_matmul import w8a8_matmul
from slmkit.kernels.wo_matmul import wo_matmul
from slmkit.quantize.groupwise import SCALE_DTYPE, dequantize, num_groups, pack_int4, unpack_int4

INT8_MAX = 127
_TINY = 1e-8  # floor for scales of all-zero rows/tokens, so dequantization never divides by zero


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight → int8 weight (out, in) and float32 scale (out,)."""
    scale = (weight.detach().abs().amax(dim=1).float() / INT8_MAX).clamp(min=_TINY)  # (out,)
    q = torch.round(weight.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, in) float activations → int8 (tokens, in) and float32 scale (tokens, 1)."""
    scale = (x.detach().abs().amax(dim=1, keepdim=True).float() / INT8_MAX).clamp(min=_TINY)
    q = torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float activations → int8 with one given float32 scale (static quantization; clamps outliers)."""
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def _int_mm_supported(x_q: torch.Tensor, weight_q: torch.Tensor) -> bool:
    if x_q.device.type == "cpu":
        return True
    if x_q.device.type == "cuda":  # cuBLASLt int8 GEMM shape rules
        m, k = x_q.shape
        return m > 16 and k % 8 == 0 and weight_q.shape[0] % 8 == 0
    return False


def int8_matmul(x_q: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (N, K)ᵀ → int32 (M, N), exact.

    Uses ``torch._int_mm`` where the device and shape allow it; elsewhere an exact float64 reference
    (every product and partial sum of int8 values is an integer below 2**53).
    """
    if _int_mm_supported(x_q, weight_q):
        return torch._int_mm(x_q, weight_q.t())
    return (x_q.double() @ weight_q.double().t()).to(torch.int32)


def int8_matmul_ref(x_q: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`int8_matmul` in int64 arithmetic."""
    return (x_q.long() @ weight_q.long().t()).to(torch.int32)


class W8A8Linear(nn.Module):
    """A linear layer with int8 weights (per output channel) and int8 activations.

    On CUDA the forward is one fused Triton kernel (``slmkit.kernels.w8a8_matmul``); on CPU it quantizes
    the activations and runs ``torch._int_mm``.

    Buffers: ``weight`` int8 (out, in), ``weight_scale`` float32 (out,), optional ``bias`` (float),
    and for static activation quantization ``input_scale`` float32 (one value).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, act_quant: str = "dynamic",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if act_quant not in ("dynamic", "static"):
            raise ValueError(f"act_quant must be 'dynamic' or 'static', got {act_quant!r}")
        self.in_features, self.out_features, self.act_quant = in_features, out_features, act_quant
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32) if act_quant == "static" else None)

    @classmethod
    def from_float(cls, weight_out_in: torch.Tensor, bias: torch.Tensor | None, act_quant: str,
                   input_abs_max: torch.Tensor | None = None) -> "W8A8Linear":
        """Quantize a float (out, in) weight; static quantization needs the calibrated input max."""
        weight_q, weight_scale = quantize_per_channel(weight_out_in)
        dtype = bias.dtype if bias is not None else weight_out_in.dtype
        return cls.from_quantized(weight_q, weight_scale, bias, act_quant, input_abs_max, dtype)

    @classmethod
    def from_quantized(cls, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                       act_quant: str, input_abs_max: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float32) -> "W8A8Linear":
        """Build from int8 weight codes (out, in) and per-channel scales (e.g. from GPTQ)."""
        out_features, in_features = weight_q.shape
        module = cls(in_features, out_features, bias is not None, act_quant, dtype=dtype)
        module.weight, module.weight_scale = weight_q.to(torch.int8), weight_scale.float().reshape(-1)
        if bias is not None:
            module.bias = bias.detach().clone()
        if act_quant == "static":
            if input_abs_max is None:
                raise ValueError("static activation quantization needs input_abs_max from calibration")
            module.input_scale = (input_abs_max.max().float() / INT8_MAX).clamp(min=_TINY).reshape(())
        return module.to(weight_q.device)

    def layout(self) -> dict:
        """What the checkpoint manifest needs to rebuild this module before loading its tensors."""
        return {"type": "W8A8Linear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "act_quant": self.act_quant}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        if x2.is_cuda:  # one fused Triton kernel: per-token quantization, int8 GEMM, dequant epilogue
            out = w8a8_matmul(x2, self.weight, self.weight_scale, self.bias, self.input_scale)
            return out.reshape(*shape[:-1], self.out_features)
        if self.act_quant == "dynamic":
            x_q, x_scale = quantize_per_token(x2)
        else:
            x_q, x_scale = quantize_per_tensor(x2, self.input_scale), self.input_scale
        acc = int8_matmul(x_q, self.weight)  # (tokens, out) int32
        out = acc.float() * x_scale * self.weight_scale  # dequantize
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act_quant={self.act_quant}"


class WeightOnlyLinear(nn.Module):
    """A linear layer with integer weights (int8, or int4 packed two a byte) and float activations.

    W8A16 / W4A16: codes per (row, group of ``group_size`` input columns; ``None`` = per row) with a
    float16 scale and, when asymmetric, an int8 zero point; see :mod:`slmkit.quantize.groupwise`.
    Buffers: ``weight_packed`` (int8 (out, in) for 8 bits, uint8 (out, ceil(in/2)) for 4 bits),
    ``weight_scale`` float16 (out, G), ``weight_zero_point`` int8 (out, G) or None, ``bias`` or None.

    On CUDA the forward runs the fused dequantize-GEMM Triton kernel (``slmkit.kernels.wo_matmul``) for
    small batches and dequantize + cuBLAS above ``kernel_max_tokens``; on CPU the PyTorch reference.
    """

    kernel_max_tokens = 256  # tokens per call up to which the fused kernel runs on CUDA

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = 4,
                 group_size: int | None = 128, symmetric: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = num_groups(in_features, group_size)
        if bits == 4:
            packed = torch.full((out_features, (in_features + 1) // 2), 0x88, dtype=torch.uint8)
        else:
            packed = torch.zeros(out_features, in_features, dtype=torch.int8)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=SCALE_DTYPE))
        self.register_buffer("weight_zero_point",
                             None if symmetric else torch.zeros(out_features, groups, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                   group_size: int | None, bias: torch.Tensor | None) -> "WeightOnlyLinear":
        """Build from int8 codes (out, in) and group parameters (as computed by RTN, GPTQ or AWQ)."""
        out_features, in_features = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        module = cls(in_features, out_features, bias is not None, bits, group_size, zero is None, dtype=dtype)
        module.weight_packed = pack_int4(codes) if bits == 4 else codes.to(torch.int8).clone()
        module.weight_scale = scale.to(SCALE_DTYPE).clone()
        module.weight_zero_point = None if zero is None else zero.to(torch.int8).clone()
        if bias is not None:
            module.bias = bias.detach().clone()
        return module.to(codes.device)

    def codes(self) -> torch.Tensor:
        """The integer codes (out, in) int8, unpacked."""
        return unpack_int4(self.weight_packed, self.in_features) if self.bits == 4 else self.weight_packed

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float (out, in) weight these codes stand for."""
        return dequantize(self.codes(), self.weight_scale, self.weight_zero_point, self.group_size, dtype)

    def layout(self) -> dict:
        """What the checkpoint manifest needs to rebuild this module before loading its tensors."""
        return {"type": "WeightOnlyLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        if x2.is_cuda and x2.shape[0] <= self.kernel_max_tokens:
            out = wo_matmul(x2, self.weight_packed, self.weight_scale, self.weight_zero_point, self.bits,
                            self.group_size, self.in_features, self.bias)
        else:
            weight = self.dequantized_weight(x.dtype)
            out = torch.nn.functional.linear(x2, weight, None if self.bias is None else self.bias.to(x.dtype))
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")
