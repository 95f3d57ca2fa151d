"""`factory sample`: generate from the base model, base + adapter, or the merged model,
streaming tokens as they come (seed 000's sample step, seed 004's inference test)."""

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
