"""nanokyro: a compact, high-throughput LLM serving engine."""
from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.engine import LLM, AsyncEngine, LLMEngine, RequestOutput
from nanokyro.grammar import StructuredOutput
from nanokyro.sampler import SamplingParams

__all__ = ["LLM", "AsyncEngine", "LLMEngine", "EngineConfig", "ModelConfig", "RequestOutput", "SamplingParams",
           "StructuredOutput"]
