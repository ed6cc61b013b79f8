"""slmkit: make open Transformer language models smaller and faster, and prove what quality they kept.

    model = slmkit.load_model("smollm2-135m")
    slmkit.quantize(model, SmoothQuantConfig(alpha=0.5), calib=slmkit.calib_data(model, n=64))
    report = slmkit.evaluate(model, reference="smollm2-135m")
    slmkit.save(model, "out/smollm2-w8a8")
"""

from slmkit._version import __version__
from slmkit.config import BaseConfig
from slmkit.data import DataConfig, calib_data
from slmkit.errors import SlmkitError
from slmkit.eval import EvalConfig, EvalReport, evaluate
from slmkit.generation import generate
from slmkit.models.checkpoint import save
from slmkit.models.loading import load_model
from slmkit.quantize import SmoothQuantConfig, quantize
from slmkit.recipes import Recipe, run_recipe

__all__ = [
    "__version__",
    "BaseConfig",
    "DataConfig",
    "EvalConfig",
    "EvalReport",
    "Recipe",
    "SlmkitError",
    "SmoothQuantConfig",
    "calib_data",
    "evaluate",
    "generate",
    "load_model",
    "quantize",
    "run_recipe",
    "save",
]
