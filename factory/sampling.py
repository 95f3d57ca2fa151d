"""`factory sample`: generate from the base model, base + adapter, the merged model or a
GGUF file, streaming tokens as they come (seed 000's sample step, seed 004's inference test)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from factory import modeling
from factory.config import FactoryConfig
from factory.errors import InputError
from factory.workspace import Workspace


class Sampler:
    def __init__(self, cfg: FactoryConfig, ws: Workspace, which: str, *, max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int):
        backend = modeling.select_backend(cfg.model.backend)
        if which == "base":
            self.model, self.tokenizer = modeling.load_for_inference(cfg, ws, backend)
        elif which == "adapter":
            adapter = ws.path(cfg.save.lora_path)
            if not (adapter / "adapter_config.json").exists():
                raise InputError(f"{ws.rel(adapter)} has no adapter; run `factory run finetune` or use --model base")
            self.model, self.tokenizer = modeling.load_for_inference(cfg, ws, backend, adapter=adapter)
        else:
            folder = ws.path(cfg.save.merged_path) if which == "merged" else ws.path(which)
            if not (Path(folder) / "config.json").exists():
                raise InputError(f"{ws.rel(folder)} is not a model folder (no config.json)")
            self.model, self.tokenizer = modeling.load_for_inference(cfg, ws, backend, path=str(folder))
        self.settings = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0)
        if temperature > 0:
            self.settings.update(temperature=temperature, top_p=top_p, top_k=top_k)

    def reply(self, messages: list[dict], emit: Callable[[str], object]) -> str:
        """Generate the assistant's answer to `messages`, calling `emit` with each new piece."""
        from transformers import TextIteratorStreamer

        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True).to(next(self.model.parameters()).device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=self.model.generate, kwargs=dict(**encoded, streamer=streamer, **self.settings))
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            emit(piece)
        worker.join()
        return "".join(pieces).strip()


class GGUFSampler:
    """The same, through llama.cpp's runtime and the chat template embedded in the GGUF: what
    llama-server and Ollama will do with the file."""

    def __init__(self, cfg: FactoryConfig, ws: Workspace, path: Path, *, max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int):
        from factory import llama_cpp, plan

        if not path.is_file():
            raise InputError(f"{ws.rel(path)} not found; run `factory run quantize` first")
        self.llm = llama_cpp.load(path, n_ctx=plan.context_length(cfg) + max_new_tokens)
        self.settings = dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k if temperature > 0 else 1)

    def reply(self, messages: list[dict], emit: Callable[[str], object]) -> str:
        pieces = []
        for chunk in self.llm.create_chat_completion(messages, stream=True, **self.settings):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            if piece:
                pieces.append(piece)
                emit(piece)
        return "".join(pieces).strip()


def open_sampler(cfg: FactoryConfig, ws: Workspace, which: str, **settings) -> Sampler | GGUFSampler:
    """A GGUF file goes to llama.cpp; anything else to transformers."""
    if which.endswith(".gguf"):
        return GGUFSampler(cfg, ws, ws.path(which), **settings)
    return Sampler(cfg, ws, which, **settings)
