"""nanokyro: a compact, high-throughput LLM serving engine."""
from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.request import RequestOutput, SamplingParams, StructuredOutput


def __getattr__(name: str):
    # The offline API loads torch; the server's frontend process imports this package without it.
    if name == "LLM":
        from nanokyro.llm import LLM

        return LLM
    if name == "EngineCore":
        from nanokyro.core import EngineCore

        return EngineCore
    raise AttributeError(f"module 'nanokyro' has no attribute {name!r}")


__all__ = ["LLM", "EngineCore", "EngineConfig", "ModelConfig", "RequestOutput", "SamplingParams", "StructuredOutput"]
