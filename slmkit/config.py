"""Strict config dataclasses and the transform registry.

Every transform is a config dataclass plus one function ``fn(model, config, calib=None) -> model``.
The config says everything about the step: it is what a recipe lists, and what a checkpoint's manifest
records, so a saved model says how it was made.

``BaseConfig.from_dict`` refuses unknown keys (naming the key and the allowed ones) so a typo in a recipe
fails before any work starts. Subclasses validate values in ``__post_init__`` with :func:`check_choice`
and friends, raising :class:`ValueError` that names the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

from slmkit.errors import SlmkitError


class ConfigError(SlmkitError, ValueError):
    """A config field has a bad value or an unknown key (a ValueError, as the style asks)."""


@dataclasses.dataclass
class BaseConfig:
    """Base of all step configs: strict construction from dicts and a stable dict form.

    Subclasses set ``name`` (the key used in recipes, e.g. ``smoothquant``) and ``category`` (which public
    function applies them: ``quantize``, ``prune``, ...).
    """

    name: ClassVar[str] = ""
    category: ClassVar[str] = ""
    # whether the step can run on a quantized model (recipes refuse other steps after a quantize step)
    runs_on_quantized: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (JSON/YAML friendly)."""
        return dataclasses.asdict(self)

    def token_lengths(self) -> dict[str, int]:
        """The sequence lengths (in tokens) the step feeds the model beyond the recipe's calibration blocks,
        by field name; recipes check them against the model's context before any work. None by default: {}."""
        return {}

    def check_environment(self, device: str) -> None:
        """Raise SlmkitError if this machine cannot run the step on ``device`` (an optional package missing
        or too old). Recipes call it for every step before any work; nothing to check by default."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "") -> "BaseConfig":
        """Build the config from a dict, failing on unknown keys with the list of allowed ones."""
        data = dict(data or {})
        where = where or cls.name or cls.__name__
        allowed = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}"
            )
        try:
            return cls(**data)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        except TypeError as error:  # e.g. a missing required field
            raise ConfigError(f"{where}: {error}") from None


def check_choice(field: str, value: Any, allowed: tuple) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{field} must be one of {choices}, got {value!r}")


def check_range(field: str, value: Any, low: float, high: float, kind: type = float) -> None:
    """Raise ConfigError unless ``low <= value <= high`` and value has the right numeric type."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise ConfigError(f"{field} must be a {kind.__name__} in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{field} must be in [{low}, {high}], got {value!r}")


def check_fraction(field: str, value: Any, note: str = "") -> None:
    """Raise ConfigError unless ``0 <= value < 1`` (a fraction removed: 1 would remove everything)."""
    check_range(field, value, 0.0, 1.0)
    if value >= 1.0:
        raise ConfigError(f"{field} must be in [0, 1), got {value!r}{note}")


def check_type(field: str, value: Any, kind: type | tuple) -> None:
    """Raise ConfigError unless ``value`` is an instance of ``kind`` (bools are not ints)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{field} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{field} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")


def check_regexes(field: str, patterns: Any) -> None:
    """Raise ConfigError unless ``patterns`` is a list of valid regular expressions."""
    import re

    check_type(field, patterns, list)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ConfigError(f"{field}: {pattern!r} is not a valid regex ({error})") from None


@dataclasses.dataclass
class LayerwiseFields:
    """Fields of the steps that walk calibration activations block by block (see ``slmkit.calib``).

    Mixed into their configs, first so its fields come last (``class C(LayerwiseFields, SparsityConfig)``); their
    ``__post_init__`` calls :meth:`check_layerwise`.
    """

    batch_size: int = 8  # calibration sequences per forward pass
    max_seq_len: int = 2048  # longer calibration sequences are split: bounds activation memory
    device: str | None = None  # where each block is calibrated (default: where the model is)

    def check_layerwise(self) -> None:
        """Validate the layer-wise walk fields."""
        check_range("batch_size", self.batch_size, 1, 65536, int)
        check_range("max_seq_len", self.max_seq_len, 16, 1 << 20, int)
        if self.device is not None:
            check_type("device", self.device, str)


def check_calibration(what: str, calib: Any, vocab_size: int | None = None) -> None:
    """Fail unless ``calib`` is a non-empty (num_blocks, block_len) tensor of token ids (below ``vocab_size``,
    the model's embedding rows, when given: ids of another tokenizer would fail deep inside the model)."""
    import torch

    if (not isinstance(calib, torch.Tensor) or calib.ndim != 2 or calib.numel() == 0
            or calib.is_floating_point() or calib.dtype == torch.bool):
        shape = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise SlmkitError(f"{what} needs calibration data: a non-empty (num_blocks, block_len) tensor of token "
                          f"ids such as slmkit.calib_data(model), got {shape}")
    low, high = int(calib.min()), int(calib.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise SlmkitError(f"{what}: calibration token ids run from {low} to {high}, outside this model's vocabulary "
                          f"(0..{vocab_size - 1 if vocab_size else '?'}); make them with this model's tokenizer "
                          "(slmkit.calib_data(model))")


@dataclasses.dataclass(frozen=True)
class Transform:
    """A registered transform: its config class and the function that applies it."""

    config_class: type[BaseConfig]
    apply: Callable[..., Any]
    needs_calibration: bool
    uses_context: bool = False
    resumable: bool = False  # a layer-by-layer walk that takes checkpoint=WalkCheckpoint (see slmkit.calib)


@dataclasses.dataclass
class StepContext:
    """What a step may need beyond the model and its config (given to ``uses_context`` transforms).

    Distillation needs the original model as its teacher and a directory for its resumable checkpoints.
    """

    original_model: str  # load_model source of the uncompressed model (the recipe's model)
    work_dir: Any = None  # Path for the step's resumable state, or None (no resume)
    device: str = "cpu"


_REGISTRY: dict[str, Transform] = {}


def register(config_class: type[BaseConfig], needs_calibration: bool = False, uses_context: bool = False,
             resumable: bool = False):
    """Decorator registering ``fn(model, config, calib=None)`` as the handler of ``config_class``.

    ``needs_calibration``: fn takes calibration token ids as its third argument.
    ``uses_context``: fn takes a :class:`StepContext` as its third argument instead.
    ``resumable``: fn also takes ``checkpoint=`` (a :class:`slmkit.calib.WalkCheckpoint` or None) and
    saves each finished block there, so an interrupted run resumes after the last one.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not config_class.name or not config_class.category:
            raise TypeError(f"{config_class.__name__} needs class attributes name and category")
        _REGISTRY[config_class.name] = Transform(config_class, fn, needs_calibration, uses_context, resumable)
        return fn

    return decorate


def registered() -> dict[str, Transform]:
    """All registered transforms by recipe name (importing slmkit registers the built-in ones)."""
    return dict(_REGISTRY)


def lookup(config: BaseConfig | str) -> Transform:
    """The registered transform for a config instance or a recipe step name."""
    name = config if isinstance(config, str) else config.name
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown step {name!r}; available steps: {', '.join(sorted(_REGISTRY)) or '(none)'}"
        )
    return _REGISTRY[name]


def config_from_step(step: dict[str, Any], where: str) -> BaseConfig:
    """Turn a recipe step ``{name: {field: value}}`` into its config object."""
    if not isinstance(step, dict) or len(step) != 1:
        raise ConfigError(f"{where}: a step must be a mapping with exactly one key (the step name)")
    (name, fields), = step.items()
    transform = lookup(name)
    if fields is not None and not isinstance(fields, dict):
        raise ConfigError(f"{where}.{name}: expected a mapping of fields, got {fields!r}")
    return transform.config_class.from_dict(fields, where=f"{where}.{name}")


def apply_step(model, config: BaseConfig, calib=None, category: str | None = None,
               context: StepContext | None = None, checkpoint_dir=None):
    """Apply a registered transform to ``model`` in place and record it in ``model.slmkit.steps``.

    ``category`` (e.g. "quantize") makes ``slmkit.quantize(model, PruneConfig())`` fail clearly.
    Calibration transforms given ``calib=None`` use ``slmkit.calib_data(model)`` (embedded corpus; blocks
    no longer than the model's context).
    Context transforms (distillation) given ``context=None`` use the model's own source as the original.
    ``checkpoint_dir``: where resumable walks save each finished block; ignored by the other transforms.
    """
    from slmkit.models.record import get_record, require_model

    require_model(model, f"slmkit.{category or 'apply_step'}")
    if not isinstance(config, BaseConfig):
        raise ConfigError(f"expected a step config such as SmoothQuantConfig(...), got {type(config).__name__}")
    transform = lookup(config)
    if not isinstance(config, transform.config_class):
        raise ConfigError(f"expected a {transform.config_class.__name__}, got {type(config).__name__}")
    if category is not None and config.category != category:
        raise ConfigError(
            f"{type(config).__name__} is a {config.category} step; call slmkit.{config.category}() instead"
        )
    if config.category in ("prune", "quantize"):
        from slmkit.models.modeling import shares_ffn

        if shares_ffn(model):
            raise SlmkitError(f"{type(config).__name__}: this model's blocks share FFN weights, which "
                              f"{config.category} steps do not support yet; {config.category} before shared_ffn")
    if transform.needs_calibration and calib is None:
        from slmkit.data import calib_data
        from slmkit.models.arch import context_length

        # the default blocks (512 tokens) shortened to a model built for fewer positions
        calib = calib_data(model, seq_len=min(512, context_length(model.config) or 512))
    if transform.needs_calibration:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        check_calibration(type(config).__name__, calib, getattr(embeddings, "num_embeddings", None))
    if transform.uses_context:
        transform.apply(model, config, context or StepContext(original_model=get_record(model).source))
    elif transform.resumable and checkpoint_dir is not None:
        from slmkit.calib import WalkCheckpoint

        transform.apply(model, config, calib, checkpoint=WalkCheckpoint.for_step(checkpoint_dir, model, config, calib))
    elif transform.needs_calibration:
        transform.apply(model, config, calib)
    else:
        transform.apply(model, config)
    get_record(model).steps.append({config.name: config.to_dict()})
    return model
