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
