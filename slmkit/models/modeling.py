"""``SlmForCausalLM``: a Llama-architecture model whose blocks may differ in head count and FFN width.

Structured pruning with per-layer widths (and OpenELM-style layer-wise scaling) produce models no
standard transformers class can hold. ``SlmConfig`` is a ``LlamaConfig`` plus three optional per-layer
lists; each block is transformers' own ``LlamaDecoderLayer`` built from a per-layer copy of the config,
so attention, RoPE, KV caches and ``generate`` are transformers' code, unchanged. Both classes are
registered with the Auto classes when slmkit is imported, so after ``import slmkit``::

    AutoModelForCausalLM.from_pretrained("out/smollm2-width-per-layer")

loads a saved model with no further code.
"""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaForCausalLM, LlamaModel,
                                                      LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding)


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

    def for_layer(self, index: int) -> "SlmConfig":
        """A copy of this config with the standard width fields set to layer ``index``'s values."""
        config = copy.deepcopy(self)
        if self.layer_num_heads is not None:
            config.num_attention_heads = self.layer_num_heads[index]
            config.num_key_value_heads = self.layer_num_kv_heads[index]
        if self.layer_intermediate_sizes is not None:
            config.intermediate_size = self.layer_intermediate_sizes[index]
        return config


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


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` know ``model_type: slm``."""
    AutoConfig.register("slm", SlmConfig, exist_ok=True)
    AutoModel.register(SlmConfig, SlmModel, exist_ok=True)
    AutoModelForCausalLM.register(SlmConfig, SlmForCausalLM, exist_ok=True)


register_auto_classes()
