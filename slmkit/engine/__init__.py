"""The KV-cache inference engine: paged cache, continuous batching, prefix caching, CUDA graphs.

``Engine(model, EngineConfig(...))`` runs any model ``load_model`` returns; ``SamplingParams`` says how
each request samples and stops. See :mod:`slmkit.engine.engine`.
"""

from slmkit.engine.engine import Completion, Engine, EngineConfig, StreamDelta
from slmkit.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "SamplingParams", "StreamDelta"]
