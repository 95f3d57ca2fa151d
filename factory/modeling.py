"""Models for the model phases: backend choice, loading, LoRA, generation and answer loss.

How a model writes a conversation is factory.chat's (one ChatFormat per loaded model).

Two backends share TRL's SFTTrainer:
- `unsloth`: Unsloth's FastModel (fast 4-bit LoRA), CUDA only;
- `hf`: transformers + PEFT, on CPU, Apple MPS or CUDA (bitsandbytes 4-bit on CUDA).

torch, transformers, peft and unsloth are imported inside the functions that need them, so
that importing this module costs nothing (the CLI answers --help without them).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from factory.config import FactoryConfig
from factory.errors import InputError
from factory.workspace import Workspace

log = logging.getLogger("factory.modeling")

@dataclass(frozen=True)
class Backend:
    name: str  # "unsloth" or "hf"
    reason: str
    device: str  # "cuda", "mps" or "cpu"


def select_backend(requested: str) -> Backend:
    """Pick the backend and say why (the log and training-status.json carry the reason)."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "mps" if torch.backends.mps.is_available() else "cpu"
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "hf":
        return Backend("hf", "model.backend is hf", device)
    if requested == "unsloth":
        if not cuda:
            raise InputError("model.backend is unsloth, but there is no CUDA device; set model.backend: hf (or auto)")
        if not has_unsloth:
            raise InputError('model.backend is unsloth, but unsloth is not installed: pip install -e ".[gpu]"')
        _import_unsloth()
        return Backend("unsloth", "model.backend is unsloth", device)
    if not cuda:
        return Backend("hf", f"no CUDA device (unsloth needs one); running on {device}", device)
    if not has_unsloth:
        return Backend("hf", 'CUDA found but unsloth is not installed (pip install -e ".[gpu]")', device)
    try:
        _import_unsloth()
    except InputError as e:
        return Backend("hf", str(e), device)
    return Backend("unsloth", "CUDA found and unsloth imports", device)


def _import_unsloth() -> None:
    # Unsloth patches transformers, trl and peft: it must be imported before them.
    try:
        import unsloth  # noqa: F401
    except (NotImplementedError, ImportError, RuntimeError) as e:
        raise InputError(f"unsloth failed to import: {type(e).__name__}: {e}") from None


def model_path(name: str, ws: Workspace) -> str:
    """A local folder (relative to the workspace or absolute) or else a hub id."""
    local = ws.path(name)
    if local.is_dir():
        if not (local / "config.json").exists():
            raise InputError(f"{ws.rel(local)} has no config.json; model.name must be a Hugging Face model folder or hub id")
        return str(local)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise InputError(f"model.name {name!r}: no such folder, and it is not a hub id (owner/name)")
    return name


def torch_dtype(cfg: FactoryConfig, device: str):
    import torch

    if cfg.model.dtype:
        return getattr(torch, cfg.model.dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU and MPS train reliably in fp32


def load_model(cfg: FactoryConfig, ws: Workspace, backend: Backend, *, max_seq_length: int):
    """The base model and its chat format, as the finetune phase needs them."""
    from factory.chat import ChatFormat

    path = model_path(cfg.model.name, ws)
    if backend.name == "unsloth":
        from unsloth import FastModel

        model, tokenizer = FastModel.from_pretrained(
            model_name=path, max_seq_length=max_seq_length, dtype=cfg.model.dtype and torch_dtype(cfg, "cuda"),
            load_in_4bit=cfg.model.load_in_4bit,
        )
        return model, ChatFormat.from_tokenizer(tokenizer, cfg.dataset.chat_template, model.generation_config)
    return load_for_inference(cfg, ws, backend, path=path, quantize=cfg.model.load_in_4bit)


def load_for_inference(cfg: FactoryConfig, ws: Workspace, backend: Backend, *, path: str | None = None,
                       adapter: Path | None = None, quantize: bool = False):
    """A model for generation and its chat format: the base (from model.name or `path`), plus a
    LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory.chat import ChatFormat
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the phase has its own progress; keep CI logs readable
    path = path or model_path(cfg.model.name, ws)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg, backend.device)}
    if quantize and backend.device == "cuda":
        if importlib.util.find_spec("bitsandbytes") is None:
            log.warning('model.load_in_4bit needs bitsandbytes (pip install -e ".[gpu]"); loading in 16-bit')
        else:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch_dtype(cfg, "cuda"),
            )
    elif quantize and backend.device != "cuda":
        log.info("model.load_in_4bit is ignored on %s (4-bit needs CUDA); using %s", backend.device, kwargs["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    if backend.device != "cpu" and "quantization_config" not in kwargs:
        model = model.to(backend.device)
    model.eval()
    return model, ChatFormat.from_tokenizer(tokenizer, cfg.dataset.chat_template, model.generation_config)


def add_lora(model, cfg: FactoryConfig, backend: Backend, *, rank: int):
    lora = cfg.lora
    if backend.name == "unsloth":
        from unsloth import FastModel

        return FastModel.get_peft_model(
            model, r=rank, target_modules=lora.target_modules, lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout, bias=lora.bias,
            use_gradient_checkpointing=lora.use_gradient_checkpointing, random_state=cfg.training.seed,
            finetune_vision_layers=lora.finetune_vision_layers, finetune_language_layers=lora.finetune_language_layers,
            finetune_attention_modules=lora.finetune_attention_modules, finetune_mlp_modules=lora.finetune_mlp_modules,
        )
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in lora.target_modules if m in present]
    if not targets:
        raise InputError(f"lora.target_modules {lora.target_modules} match no layer of the model")
    config = LoraConfig(r=rank, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, bias=lora.bias,
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# --- generation and loss -----------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    text: str
    stopped: bool
    """True when the answer ended with a stop token, False when it ran to max_new_tokens."""


def generate(model, chat, records: list[dict], *, batch_size: int, max_new_tokens: int,
             on_batch: Callable[[int], None] | None = None, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0) -> list[Generation]:
    """Generate the final answer of each record from the conversation before it, batched with
    left padding; greedy by default. Stops at the chat format's end-of-turn tokens."""
    import torch

    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if temperature > 0 else {"do_sample": False}
    stops = set(chat.stop_token_ids)
    results: list[Generation] = []
    for start in range(0, len(records), batch_size):
        chunk = [chat.prompt_ids(r) for r in records[start : start + batch_size]]
        width = max(len(ids) for ids in chunk)
        ids = torch.tensor([[chat.pad_token_id] * (width - len(i)) + i for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in chunk], device=device)
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    pad_token_id=chat.pad_token_id, eos_token_id=chat.stop_token_ids, **sampling)
        for row in output[:, width:].tolist():
            ended = next((i for i, token in enumerate(row) if token in stops), None)
            answer = row[:ended] if ended is not None else row
            results.append(Generation(chat.tokenizer.decode(answer, skip_special_tokens=True).strip(), ended is not None))
        if on_batch:
            on_batch(len(chunk))
    return results


def answer_loss(model, rows: list[tuple[list[int], list[int]]], *, batch_size: int,
                pad_token_id: int) -> tuple[float, int]:
    """Mean cross-entropy over the labelled tokens of (input_ids, labels) rows."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [pad_token_id] * (width - len(i)) for i, _ in chunk], device=device)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += int((labels[:, 1:] != -100).sum())
    return (total / count if count else float("nan")), count


def complete_tokenizer_files(source: str, out_dir: Path) -> list[str]:
    """Put back what transformers 5's save_pretrained leaves out of a saved model folder.

    llama.cpp's converter needs the SentencePiece `tokenizer.model` (without it a Gemma or
    Llama-2 vocabulary is not recognised) and `added_tokens_decoder` (without it the turn
    tokens become plain text in the GGUF and chat output never stops). Both are taken from
    the base model (`source`: a folder or a hub id). Returns what was restored.
    """
    import json
    import shutil

    from transformers.utils import cached_file

    def base_file(name: str) -> Path | None:
        found = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        return Path(found) if found else None

    restored = []
    model_file = base_file("tokenizer.model")
    if model_file and not (out_dir / "tokenizer.model").exists():
        shutil.copyfile(model_file, out_dir / "tokenizer.model")
        restored.append("tokenizer.model")
    base_config, config_path = base_file("tokenizer_config.json"), out_dir / "tokenizer_config.json"
    if base_config and config_path.exists():
        base = json.loads(base_config.read_text(encoding="utf-8"))
        config = json.loads(config_path.read_text(encoding="utf-8"))
        missing = {k: base[k] for k in ("added_tokens_decoder", "add_bos_token", "add_eos_token")
                   if k in base and k not in config}
        if missing:
            config.update(missing)
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            restored += [f"tokenizer_config.json:{k}" for k in missing]
    return restored


def local_model_inputs(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    """The base model folder when it is local: part of a phase's fingerprint."""
    path = ws.path(cfg.model.name)
    return [path] if path.is_dir() else []


def second_test_set(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    """The optional extra test file of evaluation.second_test_set: part of a fingerprint."""
    return [ws.path(cfg.evaluation.second_test_set)] if cfg.evaluation.second_test_set else []
