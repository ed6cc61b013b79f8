"""``SlmForCausalLM``: a Llama-architecture model whose blocks may differ in head count and FFN width,
and whose blocks may share FFN weights.

Structured pruning with per-layer widths, OpenELM-style layer-wise scaling and MobiLLaMA-style shared
FFNs produce models no standard transformers class can hold. ``SlmConfig`` is a ``LlamaConfig`` plus
optional per-layer lists; each block is transformers' own ``LlamaDecoderLayer`` built from a per-layer
copy of the config, so attention, RoPE, KV caches and ``generate`` are transformers' code, unchanged.

Shared FFNs (``ffn_groups``): the model holds one ``LlamaMLP`` per group in ``model.shared_mlps``; each
block's ``mlp`` is a :class:`SharedMLP` that calls its group's projections (references, not submodules,
so the weights are stored once in memory and once in the state dict) plus optional per-layer low-rank
corrections (``ffn_correction_rank``). Paths such as ``mlp.gate_proj`` still resolve in every block.

Both classes are registered with the Auto classes when slmkit is imported, so after ``import slmkit``::

    AutoModelForCausalLM.from_pretrained("out/smollm2-width-per-layer")

loads a saved model with no further code.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel,
                                                      LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding)

from slmkit.models.arch import blocks

SLM_SOURCE_TYPES = ("llama", "slm")  # model types whose weights an SlmForCausalLM holds unchanged


@strict
class SlmConfig(LlamaConfig):
    """A LlamaConfig with optional per-layer query heads, key/value heads and FFN widths.

    ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` hold the largest per-layer
    values (what tools reading only the standard fields should assume); ``head_dim`` is always explicit.
    """

    model_type = "slm"

    layer_num_heads: list[int] | None = None
    layer_num_kv_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    # Shared FFNs: ffn_groups[i] = index of the shared FFN block i uses (0..G-1, each used). None: own FFNs.
    ffn_groups: list[int] | None = None
    # Rank of each block's low-rank corrections to its shared gate/up/down projections (0: none).
    ffn_correction_rank: int = 0

    def validate_architecture(self):
        """Per-layer lists have one entry per layer; kv heads divide query heads in every layer."""
        layers = self.num_hidden_layers
        for field in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_sizes"):
            values = getattr(self, field)
            if values is not None and (len(values) != layers or any(v < 1 for v in values)):
                raise ValueError(f"{field} must list a positive value for each of the {layers} layers, got {values}")
        if (self.layer_num_heads is None) != (self.layer_num_kv_heads is None):
            raise ValueError("layer_num_heads and layer_num_kv_heads must be given together")
        if self.layer_num_heads is not None:
            for index, (heads, kv) in enumerate(zip(self.layer_num_heads, self.layer_num_kv_heads)):
                if heads % kv:
                    raise ValueError(f"layer {index}: {heads} query heads are not a multiple of {kv} kv heads")
        if self.ffn_correction_rank < 0 or (self.ffn_correction_rank and self.ffn_groups is None):
            raise ValueError(f"ffn_correction_rank must be >= 0 and needs ffn_groups, got {self.ffn_correction_rank}")
        if self.ffn_groups is not None:
            groups = self.ffn_groups
            if len(groups) != layers or sorted(set(groups)) != list(range(max(groups, default=-1) + 1)):
                raise ValueError(f"ffn_groups must give each of the {layers} layers a group index 0..G-1, "
                                 f"every index used; got {groups}")
            if self.layer_intermediate_sizes is not None:
                for group in set(groups):
                    widths = {w for w, g in zip(self.layer_intermediate_sizes, groups) if g == group}
                    if len(widths) > 1:
                        raise ValueError(f"layers sharing FFN {group} have different widths {sorted(widths)}")

    def for_layer(self, index: int) -> "SlmConfig":
        """A copy of this config with the standard width fields set to layer ``index``'s values."""
        config = copy.deepcopy(self)
        if self.layer_num_heads is not None:
            config.num_attention_heads = self.layer_num_heads[index]
            config.num_key_value_heads = self.layer_num_kv_heads[index]
        if self.layer_intermediate_sizes is not None:
            config.intermediate_size = self.layer_intermediate_sizes[index]
        return config

    @property
    def num_ffn_groups(self) -> int:
        """Number of shared FFNs (0 when every block has its own)."""
        return 0 if self.ffn_groups is None else max(self.ffn_groups) + 1


def to_slm_config(config, **updates) -> SlmConfig:
    """An SlmConfig holding ``config`` (a Llama or Slm config) with ``updates`` applied.

    ``head_dim`` is made explicit, since per-layer head counts no longer determine it.
    """
    if config.model_type not in SLM_SOURCE_TYPES:
        raise ValueError(f"SlmForCausalLM holds Llama-architecture models; got {config.model_type!r}")
    data = config.to_dict()
    data.pop("model_type", None)
    data.pop("transformers_version", None)
    data["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    data["architectures"] = ["SlmForCausalLM"]
    data.update(updates)
    return SlmConfig.from_dict(data)


class SharedLinear(nn.Module):
    """One block's use of a shared projection: ``shared(x) + x @ (delta_b @ delta_a)^T``.

    ``shared`` is a reference, not a submodule (its weights live once, in ``SlmModel.shared_mlps``).
    The optional rank-r correction is this block's own: ``delta_a`` (r, in) and ``delta_b`` (out, r).
    """

    def __init__(self, shared: nn.Linear, rank: int = 0):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # bypass nn.Module registration on purpose
        self.in_features, self.out_features = shared.in_features, shared.out_features
        self.delta_a = self.delta_b = None
        if rank:
            weight = shared.weight
            # LoRA-style start: a random, b zero, so the correction starts at 0 but trains.
            delta_a = torch.empty(rank, self.in_features, device=weight.device, dtype=weight.dtype)
            if delta_a.device.type != "meta":
                nn.init.kaiming_uniform_(delta_a, a=math.sqrt(5))
            self.delta_a = nn.Parameter(delta_a)
            self.delta_b = nn.Parameter(torch.zeros(self.out_features, rank, device=weight.device, dtype=weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        if self.delta_a is not None:
            out = out + F.linear(F.linear(x, self.delta_a), self.delta_b)
        return out

    def extra_repr(self) -> str:
        rank = 0 if self.delta_a is None else self.delta_a.shape[0]
        return f"in_features={self.in_features}, out_features={self.out_features}, shared=True, rank={rank}"


class SharedMLP(nn.Module):
    """A block's SwiGLU FFN computed with its group's shared projections (plus its own corrections)."""

    def __init__(self, shared: LlamaMLP, rank: int = 0):
        super().__init__()
        self.gate_proj = SharedLinear(shared.gate_proj, rank)
        self.up_proj = SharedLinear(shared.up_proj, rank)
        self.down_proj = SharedLinear(shared.down_proj, rank)
        self.act_fn = shared.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def shares_ffn(model_or_config) -> bool:
    """Whether a model (or config) has blocks sharing FFN weights."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "ffn_groups", None) is not None


def build_shared_mlps(config: SlmConfig) -> nn.ModuleList:
    """One freshly initialised ``LlamaMLP`` per FFN group of ``config``, each at its group's width."""
    first = [config.ffn_groups.index(group) for group in range(config.num_ffn_groups)]
    return nn.ModuleList(LlamaMLP(config.for_layer(index)) for index in first)


def attach_shared_mlps(model: nn.Module, shared: nn.ModuleList, groups: list[int], rank: int) -> None:
    """Give ``model`` (an SlmModel) the shared FFNs ``shared`` and point block i's mlp at ``shared[groups[i]]``."""
    model.shared_mlps = shared
    for layer, group in zip(model.layers, groups):
        layer.mlp = SharedMLP(shared[group], rank)


class SlmPreTrainedModel(LlamaPreTrainedModel):
    """Base class tying SlmConfig to the Llama weight initialisation."""

    config_class = SlmConfig


class SlmModel(SlmPreTrainedModel, LlamaModel):
    """LlamaModel whose decoder layers are built with per-layer widths."""

    def __init__(self, config: SlmConfig):
        SlmPreTrainedModel.__init__(self, config)  # not LlamaModel.__init__: it would build uniform layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config.for_layer(index), index) for index in range(config.num_hidden_layers)
        )
        if config.ffn_groups is not None:
            attach_shared_mlps(self, build_shared_mlps(config), config.ffn_groups, config.ffn_correction_rank)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class SlmForCausalLM(SlmPreTrainedModel, LlamaForCausalLM):
    """Causal LM head on :class:`SlmModel` (generation, caches and losses are LlamaForCausalLM's)."""

    def __init__(self, config: SlmConfig):
        SlmPreTrainedModel.__init__(self, config)
        self.model = SlmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def set_model_config(model: nn.Module, new_config) -> None:
    """Point the model and every submodule that held the old config at ``new_config`` (per-layer copies
    for the blocks of an SlmConfig model)."""
    old = model.config
    implementation = getattr(old, "_attn_implementation", None)
    if implementation is not None:  # chosen at load time (sdpa, eager...), not part of the saved config
        new_config._attn_implementation = implementation
    per_layer = getattr(new_config, "for_layer", None)
    for index, block in enumerate(blocks(model)):
        layer_config = per_layer(index) if per_layer else new_config
        for module in block.modules():
            if getattr(module, "config", None) is old:
                module.config = layer_config
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new_config


def become_slm(model: nn.Module) -> None:
    """Make a Llama model an SlmForCausalLM in place (same modules, same weights; set its SlmConfig first)."""
    model.__class__ = SlmForCausalLM
    model.model.__class__ = SlmModel


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` know ``model_type: slm``."""
    AutoConfig.register("slm", SlmConfig, exist_ok=True)
    AutoModel.register(SlmConfig, SlmModel, exist_ok=True)
    AutoModelForCausalLM.register(SlmConfig, SlmForCausalLM, exist_ok=True)


register_auto_classes()
