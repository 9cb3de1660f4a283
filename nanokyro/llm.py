"""Offline use: the engine core in the caller's process, no IPC. `LLM(model, **engine_options).generate(...)`."""
from __future__ import annotations

import msgspec

from nanokyro.config import EngineConfig
from nanokyro.core import EngineCore
from nanokyro.output import OutputProcessor
from nanokyro.request import CompletionOutput, Failure, PromptError, RequestOutput, SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **kwargs):
        self.engine = EngineCore(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self.outputs = OutputProcessor(self.tokenizer)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError("this model has no tokenizer (dummy weights): send token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def load_lora(self, name: str, path: str) -> None:
        """Register a PEFT LoRA directory under `name` (the engine needs max_loras >= 1); lora.AdapterError names
        what is wrong with one it can't serve."""
        self.engine.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        self.engine.unload_lora(name)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False,
                 lora: str | None = None):  # fmt: skip
        """prompts: a string, a list of token ids, or a list of either. Returns RequestOutputs in input order.
        lora: run every prompt under this adapter (or set SamplingParams.lora per prompt)."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if lora is not None:
            params = [msgspec.structs.replace(p, lora=lora) for p in params]
        prompts = [self.encode(p) for p in prompts]
        for prompt, p in zip(prompts, params):  # all or nothing: no request is queued if one is bad
            self.engine.validate(prompt, p)
        results = {}
        for prompt, p in zip(prompts, params):
            rid = self.engine.enqueue(prompt, p)
            self.outputs.add(rid, prompt, p)
            results[rid] = RequestOutput(rid, prompt, [CompletionOutput(i) for i in range(p.n)])
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=sum(p.n for p in params), desc="generate", unit="seq")
        try:
            while self.engine.has_work():
                for out in self.engine.step():
                    if out.error is not None:
                        raise RuntimeError(f"request {out.request_id} failed: {out.error.message}")
                    delta, stopped = self.outputs.process(out)
                    if stopped:  # a stop string: the core need not run this completion any further
                        self.engine.abort(out.request_id, out.index)
                    if delta is not None:
                        results[out.request_id].add(delta)
                        if bar is not None and delta.finish_reason:
                            bar.update(1)
        except BaseException as e:  # an error, or Ctrl-C: nothing of this call stays queued for the next one
            self.engine.fail_all(Failure(500, repr(e)))
            for rid in results:
                self.outputs.remove(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return list(results.values())

    def close(self) -> None:
        """Stop the other ranks' processes (tensor/pipeline parallelism); also done when the LLM is collected."""
        self.engine.close()

    def chat(self, messages, params: SamplingParams | None = None, use_tqdm: bool = False, lora: str | None = None):
        """One conversation (a list of messages) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(conv) for conv in conversations]
        return self.generate(prompts, params, use_tqdm=use_tqdm, lora=lora)
