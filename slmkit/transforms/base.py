"""What the architecture transforms share: which models they accept, and how blocks are grouped."""

from __future__ import annotations

from torch import nn

from slmkit.errors import SlmkitError
from slmkit.models.modeling import SLM_SOURCE_TYPES, shares_ffn
from slmkit.prune.base import require_float_linears

MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")  # transformers' names for expert counts


def require_dense_llama(config, what: str) -> None:
    """Fail unless ``config`` describes a dense-FFN Llama-architecture model (what SlmForCausalLM holds)."""
    experts = next((getattr(config, f) for f in MOE_FIELDS if getattr(config, f, None)), None)
    if experts:
        raise SlmkitError(f"{what}: this model's FFN is a mixture of {experts} experts ({config.model_type}); "
                          "only dense FFNs can be shared or scaled")
    if config.model_type not in SLM_SOURCE_TYPES:
        raise SlmkitError(f"{what} needs a Llama-architecture model (its result is an SlmForCausalLM); "
                          f"got {config.model_type!r}")
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise SlmkitError(f"{what} supports SwiGLU FFNs; this model uses {config.hidden_act!r}")
    if shares_ffn(config):
        raise SlmkitError(f"{what}: the model's blocks already share FFN weights; apply {what} to the original "
                          "model instead")


def require_transformable(model: nn.Module, what: str) -> None:
    """:func:`require_dense_llama` for a model, and every block linear still a float linear."""
    require_dense_llama(model.config, what)
    require_float_linears(model)


def consecutive_groups(num_layers: int, group_size: int | None) -> list[int]:
    """Group index of each block when ``group_size`` consecutive blocks form a group (None: one group)."""
    size = group_size or num_layers
    if num_layers % size:
        raise SlmkitError(f"group_size {size} does not divide the model's {num_layers} layers; "
                          f"use a divisor of {num_layers}")
    return [index // size for index in range(num_layers)]
