"""`factory sample`: generate from the base model, base + adapter, the merged model or a
GGUF file, streaming tokens as they come (seed 000's sample step, seed 004's inference test).

Sampling settings not given on the command line are the model's own (its chat format's
`sampling`, read from generation_config.json)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from factory import modeling
from factory.config import FactoryConfig
from factory.errors import InputError
from factory.workspace import Workspace


# What transformers and llama.cpp do when neither the command line nor the model says.
RUNTIME_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def _settings(model: dict, temperature: float | None, top_p: float | None, top_k: int | None) -> dict:
    """Each setting from the command line, else the model's generation config, else the
    runtime's; the repetition penalty only from the model (transformers' name)."""
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": None}
    return {key: value if value is not None else model.get(key, RUNTIME_DEFAULTS[key]) for key, value in given.items()}


class Sampler:
    def __init__(self, cfg: FactoryConfig, ws: Workspace, which: str, *, max_new_tokens: int,
                 temperature: float | None, top_p: float | None, top_k: int | None):
        backend = modeling.select_backend(cfg.model.backend)
        if which == "base":
            self.model, self.chat = modeling.load_for_inference(cfg, ws, backend)
        elif which == "adapter":
            adapter = ws.path(cfg.save.lora_path)
            if not (adapter / "adapter_config.json").exists():
                raise InputError(f"{ws.rel(adapter)} has no adapter; run `factory run finetune` or use --model base")
            self.model, self.chat = modeling.load_for_inference(cfg, ws, backend, adapter=adapter)
        else:
            folder = ws.path(cfg.save.merged_path) if which == "merged" else ws.path(which)
            if not (Path(folder) / "config.json").exists():
                raise InputError(f"{ws.rel(folder)} is not a model folder (no config.json)")
            self.model, self.chat = modeling.load_for_inference(cfg, ws, backend, path=str(folder))
        chosen = _settings(self.chat.sampling, temperature, top_p, top_k)
        self.settings = dict(max_new_tokens=max_new_tokens, do_sample=chosen["temperature"] > 0,
                             eos_token_id=self.chat.stop_token_ids, pad_token_id=self.chat.pad_token_id)
        if chosen["temperature"] > 0:
            self.settings.update(chosen)

    def reply(self, messages: list[dict], emit: Callable[[str], object]) -> str:
        """Generate the assistant's answer to `messages`, calling `emit` with each new piece."""
        import torch
        from transformers import TextIteratorStreamer

        ids = self.chat.encode(self.chat.render(messages, generation_prompt=True))
        input_ids = torch.tensor([ids], device=next(self.model.parameters()).device)
        streamer = TextIteratorStreamer(self.chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=self.model.generate, kwargs=dict(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **self.settings))
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

    def __init__(self, cfg: FactoryConfig, ws: Workspace, path: Path, *, max_new_tokens: int,
                 temperature: float | None, top_p: float | None, top_k: int | None):
        from transformers import GenerationConfig

        from factory import llama_cpp, plan
        from factory.chat import sampling_settings

        if not path.is_file():
            raise InputError(f"{ws.rel(path)} not found; run `factory run quantize` first")
        self.llm = llama_cpp.load(path, n_ctx=plan.context_length(cfg) + max_new_tokens)
        merged = ws.path(cfg.save.merged_path)  # the GGUF's source: its generation config
        config = GenerationConfig.from_pretrained(merged) if (merged / "generation_config.json").exists() else None
        chosen = _settings(sampling_settings(config), temperature, top_p, top_k)
        penalty = chosen.pop("repetition_penalty")
        self.settings = dict(max_tokens=max_new_tokens, repeat_penalty=penalty, **chosen)
        if chosen["temperature"] <= 0:
            self.settings["top_k"] = 1

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
