"""The model forward pass against the paged KV cache, and the CUDA graphs of the decode step.

The runner walks the model through :mod:`slmkit.models.arch` data, not through transformers' forward:
embeddings → for each block: norm, q/k/v projections (q/k norms, rotary: per layer type for Gemma-3,
none in SmolLM3's NoPE blocks), write keys/values into their cache slots, attention over the paged
cache (soft-capped and sliding-window where the config says so), output projection (post-norm),
residual, norm, MLP (post-norm), residual → final norm → LM head on the rows that need logits
(soft-capped for Gemma-2). The projections and MLPs are the model's own
modules, so whatever a transform put there (W8A8 linears, 2:4 sparse weights, per-layer widths)
runs unchanged.

Tokens of all sequences in a step are packed along one axis. A *prefill* batch carries chunks of
prompts (a chunk may follow keys already cached: a prefix-cache hit or an earlier chunk); a *decode*
batch carries one token per sequence and reads the cache through block tables. On CUDA the decode
step is captured once per batch size in a CUDA graph and replayed with padded inputs.

Rotary cos/sin come from tables the model's own rotary module computes once, at start-up, for every
position a sequence can reach: a step only indexes them (nothing data-dependent runs inside a CUDA graph).
LongRoPE models (Phi-3.5, Phi-4-mini) have two tables, short and long factors, and each token takes its
sequence's (``Batch.long_rope``: the engine marks the tokens of sequences longer than the switch length),
whatever else shares the step; transformers' own module decides once per call for the whole batch.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from slmkit.engine.kv_cache import LayerCache
from slmkit.errors import SlmkitError
from slmkit.kernels.attention import prefill_attention, prefill_attention_ref
from slmkit.kernels.decode_attention import decode_attention, decode_attention_ref
from slmkit.kernels.rmsnorm import rmsnorm
from slmkit.kernels.swiglu import swiglu
from slmkit.models.arch import (ArchSpec, attention_shape, attention_window, context_length, get_module, get_spec,
                                logit_softcaps, multipliers, rope_switch_length, rotary_key)


@dataclasses.dataclass
class Batch:
    """Everything one forward pass needs besides the weights; tensors live on the model's device.

    ``slots`` are flat cache positions (block · block_size + offset) where each token's keys go.
    Prefill: ``cu_q`` / ``cu_k`` (int32, S + 1) bound each sequence's queries and keys; ``gather``
    (flat slots of every key, or None when no sequence has cached keys before its chunk).
    Decode: ``block_table`` (int32, B × blocks) and ``seq_lens`` (int32, B) include the new token;
    ``max_seqlen`` bounds them without a host read (set for CUDA graphs).
    ``logits_rows``: rows whose logits are returned (None: all).
    ``long_rope`` (bool, N): LongRoPE models only, which tokens rotate with the long factors (the engine
    marks those of sequences longer than the switch length); None: the tokens at positions past it.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    decode: bool
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    gather: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    max_seqlen: int | None = None
    logits_rows: torch.Tensor | None = None
    long_rope: torch.Tensor | None = None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding of x (N, H, D) with cos/sin (N, R), R ≤ D (partial rotary leaves the rest).

    cos/sin hold each frequency twice, as transformers' rotary modules return them (``cat(freqs, freqs)``).
    By default dimension i turns with i + R/2 (transformers' rotate-half layout); ``interleaved`` turns
    adjacent pairs (2i, 2i + 1) by frequency i instead (GLM, ERNIE-4.5, Helium).
    """
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        cos, sin = cos[:, None, :half], sin[:, None, :half]
        even, odd = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    else:
        cos, sin = cos[:, None, :], sin[:, None, :]
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def _rms_norm_params(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an RMSNorm module the fused kernel can replace, else None."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not type(norm).__name__.endswith("RMSNorm") or weight is None or eps is None or getattr(norm, "bias", None) is not None:
        return None
    return weight, float(eps)


class _Layer:
    """The parts of one decoder block the runner calls, found once through the arch spec."""

    def __init__(self, model: nn.Module, spec: ArchSpec, index: int):
        block = get_module(model, spec.layers)[index]
        shape = attention_shape(model.config, index)
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.attn_norm = get_module(block, spec.attn_norm) if spec.attn_norm else None
        self.mlp_norm = get_module(block, spec.mlp_norm) if spec.mlp_norm else None
        self.attn_out_norm = get_module(block, spec.attn_out_norm) if spec.attn_out_norm else None
        self.mlp_out_norm = get_module(block, spec.mlp_out_norm) if spec.mlp_out_norm else None
        self.window = attention_window(model.config, index)  # 0: full attention
        self.rotary_key = rotary_key(model.config, spec, index)  # None: no rotary in this block
        self.rotary_interleaved = spec.rotary_interleaved
        self.softcap = logit_softcaps(model.config)[0]
        self.qkv = get_module(block, spec.qkv) if spec.qkv else None
        self.q, self.k, self.v = (None, None, None) if spec.qkv else (get_module(block, n) for n in (spec.q, spec.k, spec.v))
        self.q_norm = get_module(block, spec.q_norm) if spec.q_norm else None
        self.k_norm = get_module(block, spec.k_norm) if spec.k_norm else None
        self.qk_norm_per_head = spec.qk_norm_per_head
        self.qk_norm_after_rotary = spec.qk_norm_after_rotary
        self.o = get_module(block, spec.o)
        self.mlp = get_module(block, spec.down.rpartition(".")[0])
        attn = get_module(block, spec.o.rpartition(".")[0])
        self.scale = getattr(attn, "scaling", None) or 1.0 / math.sqrt(self.head_dim)
        # SwiGLU MLPs with separate gate / up run as gate, up → fused silu(gate)·up → down
        act = getattr(model.config, "hidden_act", None)
        self.gate = get_module(block, spec.gate) if spec.gated_mlp and spec.gate and spec.up and act in ("silu", "swish") else None
        self.up = get_module(block, spec.up) if self.gate is not None else None
        self.down = get_module(block, spec.down)

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (N, Hq, D), k and v (N, Hkv, D) of the attention input h (N, hidden), q and k through their norms
        if the block has them before its rotary (per head, or over the whole projection); fused qkv split by
        rows."""
        n = h.shape[0]
        if self.qkv is not None:
            q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = self.qkv(h).split((q_rows, kv_rows, kv_rows), dim=-1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        norm = self.q_norm is not None and not self.qk_norm_after_rotary
        if norm and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.reshape(n, self.num_heads, self.head_dim), k.reshape(n, self.num_kv_heads, self.head_dim)
        if norm and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v.reshape(n, self.num_kv_heads, self.head_dim)


class ModelRunner:
    """Runs a loaded model's forward pass over the paged cache; owns the decode CUDA graphs.

    Args:
        model: a model ``load_model`` returns (any family in :mod:`slmkit.models.arch` the engine supports).
        caches: one :class:`LayerCache` per decoder block.
        block_size: tokens per cache block.
        max_blocks_per_seq: block-table width (max model length / block size, rounded up).
        use_kernels: run the fused Triton kernels (RMSNorm + residual, SwiGLU, attention); else PyTorch.
    """

    def __init__(self, model: nn.Module, caches: list[LayerCache], block_size: int, max_blocks_per_seq: int,
                 use_kernels: bool):
        spec = get_spec(model)
        self.model, self.spec, self.caches = model, spec, caches
        self.block_size, self.max_blocks_per_seq, self.use_kernels = block_size, max_blocks_per_seq, use_kernels
        self.embed = get_module(model, spec.embed)
        self.position_embed = get_module(model, spec.position_embed) if spec.position_embed else None
        self.rotary = get_module(model, spec.rotary) if spec.rotary else None
        self.final_norm = get_module(model, spec.final_norm)
        self.lm_head = get_module(model, spec.lm_head)
        self.layers = [_Layer(model, spec, i) for i in range(len(get_module(model, spec.layers)))]
        self.rotary_keys = sorted({layer.rotary_key for layer in self.layers if layer.rotary_key is not None})
        if len(self.layers) != len(caches):
            raise SlmkitError(f"{len(caches)} layer caches for {len(self.layers)} layers")
        self.hidden_size = model.config.hidden_size
        self.offset = spec.norm_offset
        self.final_softcap = logit_softcaps(model.config)[1]
        self.multipliers = multipliers(model.config, spec)  # Granite's constant scalings (1 elsewhere)
        # Gemma's √hidden embedding scale: newer transformers put it in the embedding module itself
        self.scale_embeddings = spec.embed_scale and not hasattr(self.embed, "embed_scale")
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._static: dict[str, torch.Tensor] = {}
        # rotary (cos, sin) per key over every reachable position; LongRoPE: the long factors' tables, and
        # the short ones' over the positions before the switch
        # (no further than the model's context: a "dynamic" NTK module rescales for the whole call past it)
        reachable = max_blocks_per_seq * block_size
        positions = min(reachable, context_length(model.config) or reachable)
        switch = rope_switch_length(model.config)
        self.rope_switch = switch if switch is not None and positions > switch else None
        self.rope_tables = {key: self._rotary_table(key, positions) for key in self.rotary_keys}
        self.short_rope_tables = ({key: self._rotary_table(key, self.rope_switch) for key in self.rotary_keys}
                                  if self.rope_switch is not None else {})

    def _rotary_table(self, key: str | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of positions 0..length-1 from the model's rotary module, in the model's dtype. The module
        sees them as one call, so a LongRoPE module picks its long factors when length > the switch length
        (and its short ones after the last, shorter, call: its own state ends as it was)."""
        weight = self.embed.weight
        probe = torch.zeros(1, dtype=weight.dtype, device=weight.device)  # the module reads dtype and device
        positions = torch.arange(length, device=weight.device)[None]
        with torch.no_grad():
            cos, sin = self.rotary(probe, positions, *((key,) if key else ()))
        return cos[0].to(weight.dtype), sin[0].to(weight.dtype)

    def _long_rope(self, batch: Batch) -> torch.Tensor:
        """LongRoPE: which tokens of ``batch`` rotate with the long factors (``Batch.long_rope``, or else the
        tokens at positions past the switch)."""
        return batch.long_rope if batch.long_rope is not None else batch.positions >= self.rope_switch

    def _rotations(self, batch: Batch) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) of each token of ``batch`` per rotary key, from the tables."""
        rotations = {}
        positions = batch.positions
        for key, (cos, sin) in self.rope_tables.items():
            cos, sin = cos[positions], sin[positions]
            if self.rope_switch is not None:
                long = self._long_rope(batch)
                rows = positions.clamp(max=self.rope_switch - 1)
                short_cos, short_sin = self.short_rope_tables[key]
                cos = torch.where(long[:, None], cos, short_cos[rows])
                sin = torch.where(long[:, None], sin, short_sin[rows])
            rotations[key] = cos, sin
        return rotations

    # ---- the forward pass ---------------------------------------------------------------------------------

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None,
                  norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta): the residual add fused with an RMSNorm when kernels are on; no norm
        (OLMo-2's blocks): (x + delta, x + delta)."""
        if norm is None:
            x = x if delta is None else x + delta
            return x, x
        params = _rms_norm_params(norm) if self.use_kernels else None
        if params is not None:
            weight, eps = params
            if delta is None:
                return rmsnorm(x, weight, eps, weight_offset=self.offset), x
            return rmsnorm(delta, weight, eps, residual=x, weight_offset=self.offset)
        if delta is not None:
            x = x + delta
        return norm(x), x

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and layer.gate is not None:
            return layer.down(swiglu(layer.gate(h), layer.up(h)))
        return layer.mlp(h)

    def _attention(self, layer: _Layer, cache: LayerCache, q, k, v, batch: Batch) -> torch.Tensor:
        keys = cache.keys.view(-1, layer.num_kv_heads, layer.head_dim)
        values = cache.values.view(-1, layer.num_kv_heads, layer.head_dim)
        keys.index_copy_(0, batch.slots, k.to(keys.dtype))
        values.index_copy_(0, batch.slots, v.to(values.dtype))
        options = dict(scale=layer.scale, softcap=layer.softcap, window=layer.window)
        if batch.decode:
            if not self.use_kernels:
                return decode_attention_ref(q, cache.keys, cache.values, batch.block_table, batch.seq_lens, **options)
            return decode_attention(q, cache.keys, cache.values, batch.block_table, batch.seq_lens,
                                    max_seqlen=batch.max_seqlen, **options)
        if batch.gather is not None:
            k, v = keys[batch.gather], values[batch.gather]
        if not self.use_kernels:
            return prefill_attention_ref(q, k, v, batch.cu_q, cu_seqlens_k=batch.cu_k, **options)
        return prefill_attention(q, k, v, batch.cu_q, batch.max_q, cu_seqlens_k=batch.cu_k, **options)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Float32 logits (rows, vocab) of ``batch.logits_rows`` (all rows when None); writes the keys/values."""
        x = self.embed(batch.input_ids)  # (N, hidden)
        if self.scale_embeddings:
            x = x * torch.tensor(self.hidden_size ** 0.5, dtype=x.dtype)
        if self.multipliers.embedding != 1.0:
            x = x * self.multipliers.embedding
        if self.position_embed is not None:
            x = x + self.position_embed(batch.positions)
        rotations = self._rotations(batch)  # (cos, sin) per rotary key, once per forward
        delta = None
        for layer, cache in zip(self.layers, self.caches):
            h, x = self._add_norm(x, delta, layer.attn_norm)
            q, k, v = layer.project_qkv(h)
            if layer.rotary_key is not None:
                cos, sin = rotations[layer.rotary_key]
                q, k = (apply_rotary(q, cos, sin, layer.rotary_interleaved),
                        apply_rotary(k, cos, sin, layer.rotary_interleaved))
            if layer.q_norm is not None and layer.qk_norm_after_rotary:
                q, k = layer.q_norm(q), layer.k_norm(k)
            attn = layer.o(self._attention(layer, cache, q, k, v, batch).flatten(1))
            if layer.attn_out_norm is not None:
                attn = layer.attn_out_norm(attn)
            if self.multipliers.residual != 1.0:
                attn = attn * self.multipliers.residual
            h, x = self._add_norm(x, attn, layer.mlp_norm)
            delta = self._mlp(layer, h)
            if layer.mlp_out_norm is not None:
                delta = layer.mlp_out_norm(delta)
            if self.multipliers.residual != 1.0:
                delta = delta * self.multipliers.residual
        x = x + delta
        if batch.logits_rows is not None:
            x = x[batch.logits_rows]
        logits = self.lm_head(self.final_norm(x)).float()
        if self.multipliers.logits_divisor != 1.0:
            logits = logits / self.multipliers.logits_divisor
        if self.final_softcap:
            logits = self.final_softcap * torch.tanh(logits / self.final_softcap)
        return logits

    # ---- decode with CUDA graphs --------------------------------------------------------------------------

    def capture(self, batch_sizes: list[int]) -> None:
        """Capture the decode step for each batch size (CUDA only); later decodes replay the smallest fit."""
        device = self.embed.weight.device
        largest = max(batch_sizes)
        self._static = {
            "input_ids": torch.zeros(largest, dtype=torch.long, device=device),
            "positions": torch.zeros(largest, dtype=torch.long, device=device),
            "slots": torch.zeros(largest, dtype=torch.long, device=device),  # block 0: the reserved scratch block
            "block_table": torch.zeros(largest, self.max_blocks_per_seq, dtype=torch.int32, device=device),
            "seq_lens": torch.ones(largest, dtype=torch.int32, device=device),
        }
        if self.rope_switch is not None:
            self._static["long_rope"] = torch.zeros(largest, dtype=torch.bool, device=device)
        pool = None
        for size in sorted(batch_sizes, reverse=True):  # largest first: smaller graphs reuse its memory pool
            batch = self._static_batch(size)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the Triton kernels and settle allocations outside the capture
                    self.forward(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(batch)
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize()

    def _static_batch(self, size: int) -> Batch:
        s = self._static
        return Batch(input_ids=s["input_ids"][:size], positions=s["positions"][:size], slots=s["slots"][:size],
                     decode=True, block_table=s["block_table"][:size], seq_lens=s["seq_lens"][:size],
                     max_seqlen=self.max_blocks_per_seq * self.block_size,
                     long_rope=s["long_rope"][:size] if "long_rope" in s else None)

    def graph_size(self, batch: int) -> int | None:
        """The smallest captured batch size that holds ``batch`` rows, or None."""
        fits = [size for size in self.graphs if size >= batch]
        return min(fits) if fits else None

    def decode(self, batch: Batch) -> torch.Tensor:
        """Logits of a decode batch: replays a CUDA graph when one fits, else runs eagerly."""
        rows = batch.input_ids.shape[0]
        size = self.graph_size(rows)
        if size is None:
            return self.forward(batch)
        s = self._static
        s["input_ids"][:rows].copy_(batch.input_ids)
        s["positions"][:rows].copy_(batch.positions)
        s["slots"][:rows].copy_(batch.slots)
        s["seq_lens"][:rows].copy_(batch.seq_lens)
        if "long_rope" in s:
            s["long_rope"][:rows].copy_(self._long_rope(batch))
            s["long_rope"][rows:size].zero_()
        table = s["block_table"]
        table[:size].zero_()
        table[:rows, : batch.block_table.shape[1]].copy_(batch.block_table)
        if size > rows:  # padded rows: token 0 at position 0, keys into the scratch block, one key of context
            for name in ("input_ids", "positions", "slots"):
                s[name][rows:size].zero_()
            s["seq_lens"][rows:size].fill_(1)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:rows]
