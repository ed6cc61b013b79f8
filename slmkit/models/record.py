"""What slmkit remembers about a loaded model: where it came from, its tokenizer, how it was changed."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn


@dataclasses.dataclass
class ModelRecord:
    """Provenance attached to a model as ``model.slmkit``.

    ``steps`` lists the configs applied in order (as ``{name: fields}`` dicts) and ``modules`` the
    replaced modules (path -> layout), both written into the checkpoint manifest on save.
    """

    source: str  # what load_model was given
    tokenizer: Any = None  # a transformers tokenizer, when one could be loaded
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    modules: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


def require_model(model: Any, what: str) -> None:
    """Fail in one line (SlmkitError) unless ``model`` is a transformers-style model (an ``nn.Module`` with a
    ``config``), as ``load_model`` returns; ``what`` names the function for the message."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        from slmkit.errors import SlmkitError

        hint = " (a source name: load it with slmkit.load_model first)" if isinstance(model, (str, bytes)) else ""
        raise SlmkitError(f"{what}: expected a model from slmkit.load_model, got {type(model).__name__}{hint}")


def get_record(model: nn.Module) -> ModelRecord:
    """The model's ModelRecord, creating an empty one for models not loaded through slmkit."""
    record = model.__dict__.get("slmkit")
    if record is None:
        record = ModelRecord(source=getattr(model.config, "_name_or_path", "") or "<in-memory model>")
        model.__dict__["slmkit"] = record
    return record


def attach_record(model: nn.Module, record: ModelRecord) -> None:
    """Attach ``record`` as ``model.slmkit`` (a plain attribute, not a submodule)."""
    model.__dict__["slmkit"] = record
