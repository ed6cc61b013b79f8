"""The KV-cache inference engine: paged cache, continuous batching, prefix caching, CUDA graphs,
prompt-lookup speculative decoding (:mod:`slmkit.engine.speculative`).

``Engine(model, EngineConfig(...))`` runs any model ``load_model`` returns; ``SamplingParams`` says how
each request samples and stops. See :mod:`slmkit.engine.engine`. ``Server(engine)`` serves it behind
an OpenAI-compatible HTTP API (:mod:`slmkit.engine.server`, ``slmkit serve``).
"""

from slmkit.engine.engine import Completion, Engine, EngineConfig, StreamDelta
from slmkit.engine.sampling import SamplingParams
from slmkit.engine.server import Server

__all__ = ["Completion", "Engine", "EngineConfig", "SamplingParams", "Server", "StreamDelta"]
