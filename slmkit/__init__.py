"""slmkit: make open Transformer language models smaller and faster, and prove what quality they kept.

    model = slmkit.load_model("smollm2-135m")
    slmkit.prune(model, slmkit.SparseGPTConfig(n_m="2:4"), calib=slmkit.calib_data(model, n=64))
    slmkit.transform(model, slmkit.SharedFFNConfig(group_size=2))    # or LayerwiseScalingConfig(...)
    slmkit.distill(model, slmkit.load_model("smollm2-135m"), slmkit.DistillConfig(steps=200))
    slmkit.quantize(model, SmoothQuantConfig(alpha=0.5), calib=slmkit.calib_data(model, n=64))
    report = slmkit.evaluate(model, reference="smollm2-135m")
    slmkit.save(model, "out/smollm2-w8a8")
"""

from slmkit._version import __version__
from slmkit.config import BaseConfig
from slmkit.data import DataConfig, calib_data
from slmkit.errors import SlmkitError
from slmkit.distill import DistillConfig, distill
from slmkit.engine import Completion, Engine, EngineConfig, SamplingParams, StreamDelta
from slmkit.eval import EvalConfig, EvalReport, evaluate
from slmkit.generation import generate
from slmkit.models.checkpoint import save
from slmkit.models.loading import load_model
from slmkit.models.modeling import SlmConfig, SlmForCausalLM  # registers model_type "slm" with the Auto classes
from slmkit.prune import (DepthPruneConfig, MagnitudePruneConfig, SparseGPTConfig, WandaConfig, WidthPruneConfig,
                          prune)
from slmkit.quantize import AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig, export, quantize
from slmkit.recipes import Recipe, run_recipe
from slmkit.transforms import LayerwiseScalingConfig, SharedFFNConfig, build_model, transform

__all__ = [
    "__version__",
    "BaseConfig",
    "Completion",
    "DataConfig",
    "DepthPruneConfig",
    "DistillConfig",
    "Engine",
    "EngineConfig",
    "EvalConfig",
    "EvalReport",
    "LayerwiseScalingConfig",
    "MagnitudePruneConfig",
    "Recipe",
    "SlmConfig",
    "SlmForCausalLM",
    "SamplingParams",
    "SharedFFNConfig",
    "SlmkitError",
    "SmoothQuantConfig",
    "RTNConfig",
    "GPTQConfig",
    "AWQConfig",
    "SparseGPTConfig",
    "StreamDelta",
    "WandaConfig",
    "WidthPruneConfig",
    "build_model",
    "calib_data",
    "distill",
    "evaluate",
    "export",
    "generate",
    "load_model",
    "prune",
    "quantize",
    "run_recipe",
    "save",
    "transform",
]
