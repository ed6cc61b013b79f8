"""Architecture knowledge as data: where blocks, attention projections, MLP projections and norms live.

Transforms never test ``isinstance(model, LlamaForCausalLM)``; they ask this module for an
:class:`ArchSpec` and walk the model by the dotted paths it holds. Supporting a new family is one entry
in ``ARCHITECTURES`` plus a tiny-model test.

Paths of block parts are relative to one decoder block; model-level paths are relative to the model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import torch
from torch import nn

from slmkit.errors import SlmkitError


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one model family live, and how its norms and linears behave."""

    family: str  # our name for the family
    model_types: tuple[str, ...]  # transformers ``config.model_type`` values it covers
    layers: str = "model.layers"  # the ModuleList of decoder blocks
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # The norms whose outputs feed q/k/v and gate/up; None where the block's input feeds them unnormalized
    # (OLMo-2 normalizes the attention and MLP outputs instead: ``attn_out_norm`` / ``mlp_out_norm``).
    attn_norm: str | None = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    qkv: str | None = None  # fused [q; k; v] projection (rows in that order) instead of q/k/v
    o: str = "self_attn.o_proj"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    gate_up: str | None = None  # fused [gate; up] projection (rows in that order)
    down: str = "mlp.down_proj"
    # A norm computes normalize(x) * (norm_offset + weight): 0 for Llama-style, 1 for Gemma's (1 + w).
    norm_offset: float = 0.0
    # GPT-2's Conv1D stores its weight as (in, out) instead of nn.Linear's (out, in).
    transposed_weights: bool = False
    # The MLP multiplies act(gate) by up elementwise, so a scale on up's rows folds into down's columns.
    gated_mlp: bool = True
    # Norms of the attention and MLP outputs before their residual adds (Gemma-2's post-norms), if any.
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    # Dimensions structured width pruning can shrink for this family. Hidden size needs the embedding to
    # carry no size-derived scale (Gemma multiplies by sqrt(hidden_size)); heads need separate q/k/v.
    width_dims: tuple[str, ...] = ("heads", "ffn", "hidden")
    # What the inference engine (slmkit.engine) needs to run a block outside transformers' forward.
    rotary: str | None = "model.rotary_emb"  # model-level module returning (cos, sin) for positions
    position_embed: str | None = None  # learned absolute positions added to the embeddings (GPT-2)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size) (Gemma)
    q_norm: str | None = None  # norms of queries / keys (Qwen3, Gemma-3, OLMo-2, EXAONE-4, Hunyuan)
    k_norm: str | None = None
    # Qwen3's q/k norms normalize each head; OLMo-2's normalize the whole projection (all heads together).
    qk_norm_per_head: bool = True
    # The q/k norms come after the rotary embedding instead of before it (Hunyuan's).
    qk_norm_after_rotary: bool = False
    # The rotary module takes the block's layer type: sliding and full layers rotate with different bases
    # (Gemma-3: 10k local, 1M global). Blocks whose ``config.no_rope_layers`` entry is 0 rotate nothing
    # (SmolLM3's NoPE layers); see :func:`rotary_key`.
    rotary_per_layer_type: bool = False
    # When the config sets a sliding window, full-attention blocks rotate nothing (EXAONE-4's global NoPE).
    full_layers_nope: bool = False
    # The rotary embedding turns adjacent pairs (x0, x1), (x2, x3)... instead of transformers' usual halves
    # (x_i, x_{i+D/2}) (GLM, ERNIE-4.5, Helium: their ``rotate_half`` interleaves); the frequencies are the same.
    rotary_interleaved: bool = False
    # Constant multipliers the family reads from its config (Granite), as config attribute names: embeddings ×
    # ``embedding_multiplier``; each block's attention and MLP outputs × ``residual_multiplier`` before their
    # residual adds; logits ÷ ``logits_divisor``. See :func:`multipliers`.
    embedding_multiplier: str | None = None
    residual_multiplier: str | None = None
    logits_divisor: str | None = None
    # Config switches (attribute, what it means) this entry does not describe: a config that turns one on is
    # refused by :func:`get_spec` with that reason (StableLM-2-12B's parallel blocks).
    unsupported_options: tuple[tuple[str, str], ...] = ()

    def linear_names(self) -> list[str]:
        """Block-relative paths of every linear projection in a block (attention, then MLP)."""
        names = [self.qkv] if self.qkv else [self.q, self.k, self.v]
        names.append(self.o)
        names += [self.gate_up] if self.gate_up else [n for n in (self.gate, self.up) if n]
        names.append(self.down)
        return [n for n in names if n]

    def hidden_norms(self) -> list[str]:
        """Block-relative paths of every norm over the hidden size (hidden-size pruning slices them all)."""
        return [n for n in (self.attn_norm, self.mlp_norm, self.attn_out_norm, self.mlp_out_norm) if n]

    def input_groups(self) -> list[list[str]]:
        """Block linears grouped by the activation they read (q/k/v share one input, gate/up another).

        Calibration statistics of an input (norms, Hessians) are computed once per group.
        """
        attn = [self.qkv] if self.qkv else [self.q, self.k, self.v]
        mlp = [self.gate_up] if self.gate_up else [n for n in (self.gate, self.up) if n]
        return [[n for n in attn if n], [self.o], mlp, [self.down]]


_LLAMA = ArchSpec(family="llama", model_types=("llama", "slm"))  # slm: SlmForCausalLM (per-layer widths)

_GEMMA2 = dataclasses.replace(
    _LLAMA,
    family="gemma2",
    model_types=("gemma2",),
    norm_offset=1.0,
    mlp_norm="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",  # normalizes the attention output, not the MLP input
    mlp_out_norm="post_feedforward_layernorm",
    width_dims=("heads", "ffn"),
    embed_scale=True,
)

# OLMo-2 (1B, 7B, 13B, 32B): no norm before attention or MLP; each output is normalized before its
# residual add, and q / k are normalized over the whole projection. No norm→projection site, so SmoothQuant
# and AWQ scale only v→o and up→down. head_dim derives from hidden_size / heads: FFN width only.
_OLMO2 = dataclasses.replace(_LLAMA, family="olmo2", model_types=("olmo2",), attn_norm=None, mlp_norm=None,
                             attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
                             q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", qk_norm_per_head=False,
                             width_dims=("ffn",))

ARCHITECTURES: tuple[ArchSpec, ...] = (
    _LLAMA,
    dataclasses.replace(_LLAMA, family="mistral", model_types=("mistral",)),
    # Qwen2's config derives head_dim from hidden_size / heads, so only FFN width can change.
    dataclasses.replace(_LLAMA, family="qwen2", model_types=("qwen2",), width_dims=("ffn",)),
    dataclasses.replace(_LLAMA, family="qwen3", model_types=("qwen3",), q_norm="self_attn.q_norm",
                        k_norm="self_attn.k_norm"),
    dataclasses.replace(_LLAMA, family="gemma", model_types=("gemma",), norm_offset=1.0, width_dims=("heads", "ffn"),
                        embed_scale=True),
    _GEMMA2,
    # Gemma-3's text-only models (270M, 1B: Gemma3ForCausalLM): Gemma-2's four norms, Qwen3's q/k norms,
    # five sliding layers to one full one, each kind with its own rotary base.
    dataclasses.replace(_GEMMA2, family="gemma3", model_types=("gemma3_text",), q_norm="self_attn.q_norm",
                        k_norm="self_attn.k_norm", rotary_per_layer_type=True),
    # SmolLM3: Llama's layout; every fourth block has no rotary (no_rope_layers). Its config derives
    # head_dim from hidden_size / heads, so only FFN width can change.
    dataclasses.replace(_LLAMA, family="smollm3", model_types=("smollm3",), width_dims=("ffn",)),
    dataclasses.replace(
        _LLAMA,
        family="phi3",
        model_types=("phi3",),
        q=None,
        k=None,
        v=None,
        qkv="self_attn.qkv_proj",
        gate=None,
        up=None,
        gate_up="mlp.gate_up_proj",
        width_dims=("ffn",),
    ),
    # IBM Granite 3.x dense models: Llama's layout with four constant multipliers (embeddings, residual branches,
    # logits; the attention scale is the attention module's own ``scaling``). Its config derives head_dim from
    # hidden_size / heads, so only FFN width can change.
    dataclasses.replace(_LLAMA, family="granite", model_types=("granite",), width_dims=("ffn",),
                        embedding_multiplier="embedding_multiplier", residual_multiplier="residual_multiplier",
                        logits_divisor="logits_scaling"),
    _OLMO2,
    # EXAONE-4.0 (1.2B, 32B): OLMo-2's output-only norms with Qwen3's per-head q/k norms; with a sliding window,
    # three sliding blocks to one full block, and the full blocks have no rotary.
    dataclasses.replace(_OLMO2, family="exaone4", model_types=("exaone4",), qk_norm_per_head=True,
                        full_layers_nope=True),
    # Tencent Hunyuan dense models (0.5B to 7B): Llama's layout with per-head q/k norms after the rotary
    # embedding (their config sets head_dim, so heads and hidden size can be pruned too).
    dataclasses.replace(_LLAMA, family="hunyuan", model_types=("hunyuan_v1_dense",),
                        q_norm="self_attn.query_layernorm", k_norm="self_attn.key_layernorm",
                        qk_norm_after_rotary=True),
    # OLMo-3 (7B, 32B): OLMo-2's blocks; three sliding blocks to one full one, each kind with its own rotary
    # settings (YaRN on the full blocks of the long-context checkpoints).
    dataclasses.replace(_OLMO2, family="olmo3", model_types=("olmo3",), rotary_per_layer_type=True),
    # Baidu ERNIE-4.5 dense (0.3B): Llama's layout, rotary over interleaved pairs (biases where ``use_bias``).
    dataclasses.replace(_LLAMA, family="ernie4_5", model_types=("ernie4_5",), rotary_interleaved=True),
    # Kyutai Helium-1 (2B): Llama's layout, rotary over interleaved pairs. Its o_proj is built hidden × hidden,
    # so heads × head_dim must stay the hidden size: FFN width only.
    dataclasses.replace(_LLAMA, family="helium", model_types=("helium",), rotary_interleaved=True,
                        width_dims=("ffn",)),
    # GLM-4 (THUDM/zai-org 9B; ``glm``: GLM-4-9B-chat-hf): Phi-3's fused gate/up, separate q/k/v with biases,
    # rotary over interleaved pairs on half of each head. ``glm4`` (GLM-4-0414, GLM-Z1) adds Gemma-2-style
    # norms on the attention and MLP outputs. The fused gate/up leaves FFN width the only prunable one here.
    dataclasses.replace(_LLAMA, family="glm", model_types=("glm",), gate=None, up=None, gate_up="mlp.gate_up_proj",
                        rotary_interleaved=True, width_dims=("ffn",)),
    dataclasses.replace(_LLAMA, family="glm4", model_types=("glm4",), gate=None, up=None,
                        gate_up="mlp.gate_up_proj", attn_out_norm="post_self_attn_layernorm",
                        mlp_out_norm="post_mlp_layernorm", rotary_interleaved=True, width_dims=("ffn",)),
    # Arcee AFM-4.5B: Llama's attention, an ungated MLP (up → ReLU² → down), so no up→down scaling site.
    dataclasses.replace(_LLAMA, family="arcee", model_types=("arcee",), gate=None, gated_mlp=False),
    # Swiss AI Apertus (8B, 70B): per-head q/k norms, an ungated MLP (up → xIELU → down), its block norms named
    # attention_layernorm / feedforward_layernorm. head_dim derives from hidden_size / heads: FFN width only.
    dataclasses.replace(_LLAMA, family="apertus", model_types=("apertus",), attn_norm="attention_layernorm",
                        mlp_norm="feedforward_layernorm", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
                        gate=None, gated_mlp=False, width_dims=("ffn",)),
    # Stability AI StableLM-2 (1.6B, Zephyr 1.6B, 3B): Llama's layout with LayerNorms (weight and bias), biases
    # on q/k/v and rotary on a quarter of each head. head_dim derives from hidden_size / heads: FFN width only.
    # StableLM-2-12B's parallel attention + MLP and per-head q/k LayerNorms are refused.
    dataclasses.replace(_LLAMA, family="stablelm", model_types=("stablelm",), width_dims=("ffn",),
                        unsupported_options=(("use_parallel_residual", "attention and MLP in parallel"),
                                             ("qk_layernorm", "per-head q/k LayerNorms"))),
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        q=None,
        k=None,
        v=None,
        qkv="attn.c_attn",
        o="attn.c_proj",
        gate=None,
        up="mlp.c_fc",
        down="mlp.c_proj",
        transposed_weights=True,
        gated_mlp=False,
        width_dims=("ffn",),
        rotary=None,
        position_embed="transformer.wpe",
    ),
)


def supported_model_types() -> list[str]:
    """Every transformers ``model_type`` slmkit knows how to walk."""
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def get_spec(model_or_config) -> ArchSpec:
    """The ArchSpec of a model (or its config); a clear error for unsupported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            for option, meaning in spec.unsupported_options:
                if getattr(config, option, None):
                    raise SlmkitError(f"{model_type} with {option}={getattr(config, option)!r} ({meaning}) is not "
                                      f"supported; only the {spec.family} layout without it is")
            return spec
    raise SlmkitError(
        f"architecture {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
    )


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """Head layout of a block's attention: query heads, key/value heads and head size."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_rows(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.num_kv_heads * self.head_dim


def attention_shape(config, layer: int | None = None) -> AttentionShape:
    """Read head counts from a transformers config (GQA aware; GPT-2's names are mapped by HF).

    Configs with per-layer widths (:class:`slmkit.models.modeling.SlmConfig`) need ``layer``.
    """
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    per_layer_heads = getattr(config, "layer_num_heads", None)
    if per_layer_heads:
        if layer is None:
            raise SlmkitError("this model has per-layer head counts; pass the layer index")
        num_heads, num_kv_heads = per_layer_heads[layer], config.layer_num_kv_heads[layer]
    return AttentionShape(num_heads, num_kv_heads, head_dim)


def attention_window(config, layer: int) -> int:
    """Sliding-window length of block ``layer``'s attention (0: full), from the config's ``layer_types``
    (Gemma-2 alternates sliding and full layers; Qwen2 slides from ``max_window_layers`` on)."""
    types = getattr(config, "layer_types", None)
    if types and types[layer] == "sliding_attention":
        return int(config.sliding_window)
    return 0


def rotary_key(config, spec: ArchSpec, layer: int) -> str | None:
    """The rotary embedding block ``layer`` applies: None for none (GPT-2's learned positions; SmolLM3's
    NoPE blocks, ``no_rope_layers[layer] == 0``; EXAONE-4's full-attention blocks when it has sliding ones),
    "" for the model's one rotary module, or the layer type the module is called with (Gemma-3:
    "sliding_attention" and "full_attention" use different bases)."""
    if spec.rotary is None:
        return None
    no_rope = getattr(config, "no_rope_layers", None)
    if no_rope and not no_rope[layer]:
        return None
    if (spec.full_layers_nope and getattr(config, "sliding_window", None) is not None
            and attention_window(config, layer) == 0):
        return None
    return config.layer_types[layer] if spec.rotary_per_layer_type else ""


def _rope_parameters(config) -> dict:
    """The config's rotary settings (``rope_parameters``; older configs: ``rope_scaling``), {} when none. Per
    layer type ({layer type: settings}) where the model rotates each kind of layer its own way (Gemma-3)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope if isinstance(rope, dict) else {}


def rope_switch_length(config) -> int | None:
    """For LongRoPE (Phi-3.5, Phi-4-mini: ``rope_type: longrope``) the length past which transformers rotates
    with the long factors instead of the short ones (``original_max_position_embeddings``); None otherwise.

    transformers decides per forward call: the long factors when the call's largest position + 1 exceeds it.
    A sequence therefore uses them for every token when its prompt is longer, and from that position on
    otherwise; the engine decides the same way per token (see ``ModelRunner``).
    """
    rope = _rope_parameters(config)
    if rope.get("rope_type", rope.get("type")) != "longrope":
        return None
    switch = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    return int(switch) if switch else None


def logit_softcaps(config) -> tuple[float, float]:
    """(attention, final) logit soft-capping of the config, 0 where off (Gemma-2: 50 and 30)."""
    return (float(getattr(config, "attn_logit_softcapping", None) or 0.0),
            float(getattr(config, "final_logit_softcapping", None) or 0.0))


@dataclasses.dataclass(frozen=True)
class Multipliers:
    """Constant scalings of a family's forward pass (all 1 except for Granite-style models)."""

    embedding: float = 1.0  # the token embeddings are multiplied by this
    residual: float = 1.0  # each attention and MLP output, before its residual add
    logits_divisor: float = 1.0  # the logits are divided by this


def multipliers(config, spec: ArchSpec | None = None) -> Multipliers:
    """The :class:`Multipliers` of ``config``, read from the attributes its :class:`ArchSpec` names."""
    spec = spec or get_spec(config)

    def read(name: str | None) -> float:
        value = getattr(config, name, None) if name else None
        return 1.0 if value is None else float(value)

    return Multipliers(read(spec.embedding_multiplier), read(spec.residual_multiplier), read(spec.logits_divisor))


def context_length(config) -> int | None:
    """The most positions the model is built for (``max_position_embeddings``, GPT-2's ``n_positions``), or
    None when the config does not say."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_context(model_or_config, length: int, what: str) -> None:
    """Raise SlmkitError when ``length`` tokens exceed the model's :func:`context_length`.

    Past it, learned position embeddings (GPT-2) index out of range and rotary ones extrapolate to
    positions the model never saw, so a window, a calibration block or a training block that long is refused
    before any work. ``what`` names it in the message, e.g. ``"the evaluation window"``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    limit = context_length(config)
    if limit is not None and length > limit:
        raise SlmkitError(f"{what} is {length} tokens, above the model's maximum of {limit} "
                          "(max_position_embeddings); use shorter ones")


def config_summary(config) -> dict[str, str]:
    """What a transformers config describes, in words, for ``slmkit info``: the family slmkit walks it as
    (or why it cannot), blocks and widths, attention kinds, and the dimensions width pruning may shrink."""
    try:
        spec = get_spec(config)
    except SlmkitError as error:
        return {"architecture": f"{getattr(config, 'model_type', None)}: {error}"}
    layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    shapes = {attention_shape(config, i) for i in range(layers)}
    ffn = sorted({intermediate_size(config, i) for i in range(layers)})
    heads = ", ".join(f"{s.num_heads} heads / {s.num_kv_heads} kv heads × {s.head_dim}" for s in sorted(shapes))
    summary = {
        "architecture": f"{config.model_type} (slmkit family {spec.family})",
        "shape": (f"{layers} blocks, hidden {config.hidden_size}, {heads}, FFN "
                  f"{'–'.join(str(w) for w in (ffn[0], ffn[-1])) if len(ffn) > 1 else ffn[0]}, "
                  f"vocab {config.vocab_size:,}"),
    }
    context = context_length(config)
    if context:
        summary["shape"] += f", context {context:,}"
    kinds: dict[str, int] = {}
    for layer in range(layers):
        window, rotary = attention_window(config, layer), rotary_key(config, spec, layer)
        kind = (f"sliding window {window}" if window else "full") + (" (no rotary)" if rotary is None and spec.rotary else "")
        kinds[kind] = kinds.get(kind, 0) + 1
    if len(kinds) > 1 or next(iter(kinds)) != "full":
        summary["attention"] = ", ".join(f"{count} × {kind}" for kind, count in kinds.items())
    if spec.rotary:
        layout = []
        factor = _rope_parameters(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None)
        if factor and factor < 1:
            head_dim = attention_shape(config, 0).head_dim
            layout.append(f"on {int(head_dim * factor)} of {head_dim} dims per head")
        if spec.rotary_interleaved:
            layout.append("over interleaved pairs")
        text = _rope_summary(config)  # the scaling (llama3, yarn...), None for plain RoPE
        if layout:
            text = f"{text}; {', '.join(layout)}" if text else f"RoPE {', '.join(layout)}"
        if text:
            summary["rotary"] = text
    if not spec.attn_norm and not spec.mlp_norm:
        summary["norms"] = ("on the attention and MLP outputs only: SmoothQuant and AWQ scale v→o and up→down, "
                            "not q/k/v or gate/up")
    scalings = multipliers(config, spec)
    if scalings != Multipliers():
        summary["multipliers"] = (f"embeddings × {scalings.embedding:g}, attention and MLP outputs × "
                                  f"{scalings.residual:g}, logits ÷ {scalings.logits_divisor:g}")
    summary["width pruning"] = ", ".join(spec.width_dims)
    return summary


def _rope_summary(config) -> str | None:
    """The rotary scaling in words when it is not plain RoPE (``llama3``, ``yarn``, ``longrope``...), else None."""
    rope = _rope_parameters(config)
    kinds = ({key: value.get("rope_type") for key, value in rope.items()} if rope and all(
        isinstance(value, dict) for value in rope.values()) else {None: rope.get("rope_type", rope.get("type"))})
    kinds = {key: kind for key, kind in kinds.items() if kind and kind != "default"}
    if not kinds:
        return None
    if kinds == {None: "dynamic"} and rope.get("alpha"):  # a fixed NTK alpha: static frequencies (Hunyuan)
        kinds = {None: f"NTK alpha {rope['alpha']:g} (fixed, not dynamic)"}
    text = ", ".join(f"{kind} ({key} layers)" if key else kind for key, kind in kinds.items())
    switch = rope_switch_length(config)
    if switch:
        text += f": short factors up to {switch:,} tokens, long ones for longer sequences"
    return text


def intermediate_size(config, layer: int) -> int:
    """FFN width of block ``layer`` (per-layer for SlmConfig models)."""
    per_layer = getattr(config, "layer_intermediate_sizes", None)
    if per_layer:
        return per_layer[layer]
    return getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``root.get_submodule`` with a readable error)."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise SlmkitError(f"model has no module {path!r}; is the architecture entry right?") from None


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``module``."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a model, in order."""
    return get_module(model, get_spec(model).layers)


def block_index(model: nn.Module, block: nn.Module) -> int:
    """Position of ``block`` among the model's decoder blocks."""
    for index, candidate in enumerate(blocks(model)):
        if candidate is block:
            return index
    raise SlmkitError("block is not one of the model's decoder blocks")


def block_linears(model: nn.Module, block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(block-relative path, module) for each linear projection of ``block``."""
    for name in get_spec(model).linear_names():
        yield name, get_module(block, name)


def block_targets(model: nn.Module, index: int, block: nn.Module, skip: list[str]) -> dict[str, nn.Module]:
    """The linears of block ``index`` a transform changes (block-relative path → module).

    Those whose model path (e.g. ``model.layers.3.self_attn.k_proj``) matches one of the ``skip``
    regexes (``re.search``) are left out.
    """
    prefix = f"{get_spec(model).layers}.{index}"
    return {name: module for name, module in block_linears(model, block)
            if not any(re.search(pattern, f"{prefix}.{name}") for pattern in skip)}


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as an (out_features, in_features) view of its storage.

    In-place edits of the returned tensor edit the module. Handles nn.Linear and GPT-2's Conv1D.
    """
    weight = module.weight
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight is (in, out)
        return weight.data.t()
    return weight.data


@dataclasses.dataclass(frozen=True)
class FoldGroup:
    """A place where a per-channel scale folds exactly: ``source`` output channels ÷ s, targets' inputs × s.

    ``source`` is a norm (its weight, and bias if any, are divided) or a linear whose output rows
    ``source_rows`` are divided. ``kv_group`` > 1 means the targets' input channels are the source rows
    repeated for each query head sharing a key/value head (GQA), so one scale serves the whole group.
    """

    name: str  # e.g. "attn_norm->qkv"
    source: nn.Module
    source_is_norm: bool
    targets: tuple[nn.Module, ...]
    source_rows: slice | None = None
    kv_group: int = 1
    head_dim: int = 0


def fold_groups(model: nn.Module, block: nn.Module) -> list[FoldGroup]:
    """Every exact scale-folding site of ``block``: norm→projections, v→o and up→down."""
    spec = get_spec(model)
    shape = attention_shape(model.config, block_index(model, block))
    qkv_targets = (get_module(block, spec.qkv),) if spec.qkv else tuple(
        get_module(block, n) for n in (spec.q, spec.k, spec.v)
    )
    mlp_targets = (get_module(block, spec.gate_up),) if spec.gate_up else tuple(
        get_module(block, n) for n in (spec.gate, spec.up) if n
    )
    groups = []  # a norm→projections site only where a norm feeds the projections (not OLMo-2's)
    if spec.attn_norm:
        groups.append(FoldGroup("attn_norm->qkv", get_module(block, spec.attn_norm), True, qkv_targets))
    if spec.mlp_norm:
        groups.append(FoldGroup("mlp_norm->gate_up", get_module(block, spec.mlp_norm), True, mlp_targets))
    # v's output rows reach o's input columns unchanged (attention mixes positions, not channels).
    if spec.qkv:
        start = shape.q_rows + shape.kv_rows
        v_source, v_rows = get_module(block, spec.qkv), slice(start, start + shape.kv_rows)
    else:
        v_source, v_rows = get_module(block, spec.v), None
    groups.append(
        FoldGroup(
            "v->o",
            v_source,
            False,
            (get_module(block, spec.o),),
            source_rows=v_rows,
            kv_group=shape.num_heads // shape.num_kv_heads,
            head_dim=shape.head_dim,
        )
    )
    if spec.gated_mlp:
        down = get_module(block, spec.down)
        if spec.gate_up:
            ffn = weight_out_in(down).shape[1]
            groups.append(
                FoldGroup("up->down", get_module(block, spec.gate_up), False, (down,), slice(ffn, 2 * ffn))
            )
        else:
            groups.append(FoldGroup("up->down", get_module(block, spec.up), False, (down,)))
    return groups
