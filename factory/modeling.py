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
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from factory.config import FactoryConfig
from factory.errors import InputError
from factory.workspace import Workspace

log = logging.getLogger("factory.modeling")

@dataclass(frozen=True)
class Backend:
    name: str  # "unsloth" or "hf"
    reason: str
    device: str  # "cuda", "mps" or "cpu"


def select_backend(requested: str, *, sharded: bool = False) -> Backend:
    """Pick the backend and say why (the log and training-status.json carry the reason).
    `sharded`: the weights are to be sharded across processes (FSDP, ZeRO-3), which unsloth's
    4-bit weights cannot be (an explicit `unsloth` is refused by the config)."""
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
    if sharded:
        return Backend("hf", "training.distributed.strategy shards the weights, which unsloth's 4-bit ones cannot be",
                       device)
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
        loaded = model, ChatFormat.from_tokenizer(faithful_tokenizer(text_tokenizer(tokenizer), path),
                                                  cfg.dataset.chat_template, model.generation_config)
    else:
        loaded = load_for_inference(cfg, ws, backend, path=path, quantize=cfg.model.load_in_4bit)
    require_positions(loaded[0], max_seq_length, "model.max_seq_length", "set model.max_seq_length to {limit} or less")
    return loaded


def text_tokenizer(loaded):
    """The tokenizer in what a loader returned: Unsloth's FastModel gives an image-text model's
    processor (a Gemma3Processor for Gemma 3 4B-27B), whose text half the chat format and the
    trainer work with (the data is text)."""
    return loaded.tokenizer if hasattr(loaded, "image_processor") and hasattr(loaded, "tokenizer") else loaded


def load_for_inference(cfg: FactoryConfig, ws: Workspace, backend: Backend, *, path: str | None = None,
                       adapter: Path | None = None, quantize: bool = False):
    """A model for generation and its chat format: the base (from model.name or `path`), plus a
    LoRA adapter."""
    from transformers import AutoModelForCausalLM

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
    from safetensors import SafetensorError

    config = require_text_generation_model(path, cfg.model.name)
    try:
        tokenizer = load_tokenizer(path)
        require_own_tokenizer(tokenizer, config, cfg.model.name)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)  # config.json read once
    except (OSError, SafetensorError, json.JSONDecodeError, RuntimeError) as e:
        # files missing, cut short or unreadable; weights of other shapes than config.json says
        # (RuntimeError, after transformers' report of each mismatch)
        raise InputError(f"model.name {cfg.model.name!r} cannot be loaded: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:400]}; check that the folder holds the whole model (config.json, "
                         "the weights it describes, the tokenizer files), or download it again") from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    if backend.device != "cpu" and "quantization_config" not in kwargs:
        model = model.to(backend.device)
    model.eval()
    return model, ChatFormat.from_tokenizer(tokenizer, cfg.dataset.chat_template, model.generation_config)


def require_text_generation_model(path: str, name: str):
    """An InputError (exit 2, before any phase loads weights) for a model that transformers'
    AutoModelForCausalLM cannot load: an image-text architecture other than Gemma's (Gemma 3,
    3n and 4 load as one; Qwen2.5-VL, Mistral Small 3.1, LLaVA and SmolVLM do not) or a
    model_type that transformers does not know (a model with code of its own). Both were a
    ValueError, exit 3."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except ValueError as e:
        raise InputError(f"model.name {name!r}: transformers {transformers.__version__} cannot read its config.json "
                         f"({str(e).splitlines()[0]}); models that need their own code (trust_remote_code) are not "
                         "supported: use a model that transformers knows, or upgrade transformers if it is newer") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        architecture = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise InputError(f"model.name {name!r} is a {architecture} ({config.model_type}), which transformers does not "
                         "load as a text-generation model (AutoModelForCausalLM); the factory fine-tunes text models "
                         "and Gemma's image-text models. Use the text-only model of that family (e.g. Qwen2.5-7B-"
                         "Instruct for Qwen2.5-VL-7B-Instruct)")
    return config


def load_tokenizer(path: str):
    """The model's tokenizer as its tokenizer.json describes it (faithful_tokenizer)."""
    from transformers import AutoTokenizer

    return faithful_tokenizer(AutoTokenizer.from_pretrained(path), path)


def faithful_tokenizer(tokenizer, path: str):
    """`tokenizer` (loaded from `path`), or the tokenizer as path's tokenizer.json describes it.

    transformers 5 loads a tokenizer whose tokenizer_config.json names LlamaTokenizerFast with
    LlamaTokenizer, which puts SentencePiece's pre-tokenizer in place of the file's byte-level
    one: DeepSeek-R1-Distill-Llama's, DeepSeek V3's and other Llama 3 vocabularies under that
    class name then lose every space, in training and in generation (transformers issue 45488;
    transformers routes only a few hub ids around it, not a download in a folder). The other
    way round, it loads every qwen2 model's tokenizer as Qwen2Tokenizer, whatever its
    tokenizer_config.json says, and that one puts a byte-level pre-tokenizer in place of a
    SentencePiece vocabulary's. Such a tokenizer (a byte-level vocabulary, the space byte's
    token `Ġ` and no SentencePiece `▁`, with a pre-tokenizer that is not byte-level; or a
    SentencePiece one with a byte-level pre-tokenizer) is loaded as the file says instead
    (PreTrainedTokenizerFast)."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or (backend.token_to_id("Ġ") is None) == (backend.token_to_id("▁") is None):
        return tokenizer
    pre_tokenizer = backend.pre_tokenizer  # its JSON alone: the whole tokenizer's takes seconds
    byte_level = pre_tokenizer is not None and _byte_level(json.loads(pre_tokenizer.__getstate__()))
    if byte_level == (backend.token_to_id("Ġ") is not None):
        return tokenizer
    log.warning("%s: transformers loads the tokenizer as %s, which replaces tokenizer.json's %s pre-tokenizer "
                "(every space would be lost); it is loaded as tokenizer.json describes it", path,
                type(tokenizer).__name__, "SentencePiece" if byte_level else "byte-level")
    return PreTrainedTokenizerFast.from_pretrained(path)


def _byte_level(pre_tokenizer: dict) -> bool:
    return pre_tokenizer.get("type") == "ByteLevel" or any(map(_byte_level, pre_tokenizer.get("pretokenizers") or []))


def require_own_tokenizer(tokenizer, config, name: str) -> None:
    """An InputError for a tokenizer far smaller than the model's vocabulary. transformers 5
    builds an empty tokenizer (its special tokens only) for a folder without tokenizer files, as
    a checkpoint saved without its tokenizer is: every word then became one unknown token, and
    the run trained on that."""
    vocabulary = getattr(config.get_text_config(), "vocab_size", None)
    if vocabulary and len(tokenizer) < vocabulary // 2:
        raise InputError(f"model.name {name!r}: its tokenizer has {len(tokenizer)} tokens and the model a vocabulary of "
                         f"{vocabulary}: the tokenizer files (tokenizer.json, or tokenizer.model or vocab.json and "
                         "merges.txt, with tokenizer_config.json) are missing from the folder or are another model's; "
                         "copy them from the model this checkpoint was trained from")


def add_lora(model, cfg: FactoryConfig, backend: Backend, *, rank: int):
    lora = cfg.lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [m for m in lora.modules_to_save if m not in present]
    if absent:
        raise InputError(f"lora.modules_to_save: {absent} match no layer of the model; its layers include "
                         f"{sorted(m for m in present if m and not m.isdigit())[:20]}")
    if backend.name == "unsloth":
        from unsloth import FastModel

        return FastModel.get_peft_model(
            model, r=rank, target_modules=sorted({name.rsplit(".", 1)[-1] for name in _lora_targets(model, lora)}),
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout, bias=lora.bias, modules_to_save=lora.modules_to_save or None,
            use_gradient_checkpointing=lora.use_gradient_checkpointing, random_state=cfg.training.seed,
            finetune_vision_layers=lora.finetune_vision_layers, finetune_language_layers=lora.finetune_language_layers,
            finetune_attention_modules=lora.finetune_attention_modules, finetune_mlp_modules=lora.finetune_mlp_modules,
        )
    from peft import LoraConfig, get_peft_model

    targets = _lora_targets(model, lora)
    head = next((name for name, module in model.named_modules() if module is model.get_output_embeddings()), None)
    if head in targets:
        head = head.rsplit(".", 1)[-1]
        # TRL's SFTTrainer computes the loss from the output embedding's weight, so an adapter there is never trained
        raise InputError(f"lora.target_modules: {head!r} is the output embedding, which the hf backend (TRL's "
                         f"SFTTrainer) cannot train through a LoRA adapter; remove it from lora.target_modules, "
                         f"or move it to lora.modules_to_save to train it whole")
    config = LoraConfig(r=rank, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, bias=lora.bias,
                        target_modules=targets, modules_to_save=lora.modules_to_save or None,
                        # else a tied embedding is merged as two matrices, and llama.cpp's converter drops Gemma's head
                        ensure_weight_tying=bool(lora.modules_to_save and getattr(model.config, "tie_word_embeddings", False)),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# Module path parts that Unsloth reads as a vision tower or projector (get_peft_regex)
VISION_PARTS = ("vision", "visual", "image", "multi_modal_projector", "mm_projector")


def _lora_targets(model, lora) -> list[str]:
    """The full names of the layers that get an adapter: `target_modules` names, kept or left
    out by the finetune_{vision,language}_layers and finetune_{attention,mlp}_modules settings
    as Unsloth keeps them, so that both backends adapt the same layers. `all-linear` names
    every linear layer (torch's, bitsandbytes' 4-bit ones, GPT-2's Conv1D) but the output
    embedding."""
    from transformers.pytorch_utils import Conv1D
    import torch

    head = model.get_output_embeddings()
    linear = {name for name, module in model.named_modules()
              if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head}
    all_linear = lora.target_modules == "all-linear"
    chosen = []
    for name, _ in model.named_modules():
        if not (name in linear if all_linear else name.rsplit(".", 1)[-1] in lora.target_modules):
            continue
        path = name.lower()
        vision = any(part in path for part in VISION_PARTS)
        if not (lora.finetune_vision_layers if vision else lora.finetune_language_layers):
            continue
        if ("attn" in path or "attention" in path) and not lora.finetune_attention_modules:
            continue
        if ("mlp" in path or "feed_forward" in path) and not lora.finetune_mlp_modules:
            continue
        chosen.append(name)
    if not chosen:
        raise InputError(f"lora.target_modules {lora.target_modules} match no layer of the model that the "
                         f"lora.finetune_* settings select; its linear layers are {sorted({n.rsplit('.', 1)[-1] for n in linear})}")
    return chosen


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
    # Greedy is the argmax at every step, as llama.cpp decodes in the GGUF check: the settings of
    # the model's generation config that change it (Qwen 2.5's repetition_penalty 1.05) are reset.
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if temperature > 0 else
                {"do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0})
    stops = set(chat.stop_token_ids)
    results: list[Generation] = []
    for start in range(0, len(records), batch_size):
        chunk = [chat.prompt_ids(r) for r in records[start : start + batch_size]]
        width = max(len(ids) for ids in chunk)
        require_positions(model, width + max_new_tokens, f"a test prompt with evaluation.max_new_tokens ({max_new_tokens})",
                          "lower evaluation.max_new_tokens, or leave out longer records (data.inputs[].transform)")
        ids = torch.tensor([[chat.pad_token_id] * (width - len(i)) + i for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in chunk], device=device)
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    pad_token_id=chat.pad_token_id, eos_token_id=chat.stop_token_ids, **sampling)
        for row in output[:, width:].tolist():
            ended = next((i for i, token in enumerate(row) if token in stops), None)
            answer = row[:ended] if ended is not None else row
            results.append(Generation(chat.answer_text(chat.tokenizer.decode(answer, skip_special_tokens=True)),
                                      ended is not None))
        if on_batch:
            on_batch(len(chunk))
    return results


TRAINING_LOGIT_VALUES = 1 << 22
"""fp32 logits per chunk of the training loss (LogitHead.loss): 4M values (16 MB), 128 positions
of a 32,000-token vocabulary, 16 of Gemma 3's; measured fastest on this CPU (bench/train_head.py)."""

LOGIT_VALUES = 1 << 25
"""fp32 logits materialised at once when scoring answers: 32M values (128 MB), 128 positions of
Gemma 3's 262,144-token vocabulary. Peak memory of the answer loss and the GGUF divergence
check is O(this), not O(batch x sequence x vocabulary) (17 GB at 32 x 512 for Gemma 3)."""


def answer_loss(model, rows: Sequence[tuple[list[int], list[int]]], *, batch_size: int,
                pad_token_id: int) -> tuple[float, int]:
    """Mean cross-entropy over the labelled tokens of `rows` ((input_ids, labels) pairs,
    labels -100 where not scored), and the number of those tokens.

    The base transformer runs on batches of rows of similar length (sorted, right-padded,
    the attention mask from each row's length, so a pad id that also occurs inside a
    conversation, such as eos, masks nothing); the head then scores only the labelled
    positions, a bounded number at a time.
    """
    import torch

    if not rows:
        return float("nan"), 0
    head = LogitHead(model, probe=rows[0][0])
    total, count = 0.0, 0
    for _, hidden, targets in answer_hidden_states(model, rows, batch_size=batch_size, pad_token_id=pad_token_id):
        for start, logits in head.chunks(hidden):
            chunk = targets[start : start + len(logits)]
            total += float(torch.nn.functional.cross_entropy(logits, chunk, reduction="sum"))
        count += len(targets)
    return (total / count if count else float("nan")), count


def answer_hidden_states(model, rows: Sequence[tuple[list[int], list[int]]], *, batch_size: int, pad_token_id: int):
    """The base transformer's final hidden states at the positions that predict a labelled
    token, batch by batch, shortest rows first: yields (the rows' indices, hidden states of
    those positions row after row (positions x hidden), the tokens they predict)."""
    import torch

    decoder = base_transformer(model)
    device = next(model.parameters()).device
    if rows:
        require_positions(model, max(len(ids) for ids, _ in rows), "a test record (prompt and answer)",
                          "leave out longer records (data.inputs[].transform)")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        lengths = [len(rows[i][0]) for i in batch]
        width = max(lengths)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : lengths[row]] = torch.tensor(rows[i][0])
            labels[row, : lengths[row]] = torch.tensor(rows[i][1])
        attention = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        targets = labels[:, 1:]
        scored = targets != -100  # position t predicts token t + 1
        with torch.inference_mode():  # no KV cache: 9 GB for Gemma 3 4B at 32 x 2,048 tokens, never read
            hidden = decoder(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).last_hidden_state
            hidden = hidden[:, :-1][scored.to(device)]
        yield batch, hidden, targets[scored].to(device)


def learned_position_embeddings(model) -> list:
    """The decoder's embeddings other than the token embedding: learned absolute positions
    (GPT-2's `wpe`, OPT's `embed_positions`), which rotary models do not have."""
    import torch

    vocabulary = model.config.get_text_config().vocab_size
    return [m for m in model.get_decoder().modules() if isinstance(m, torch.nn.Embedding)
            and m is not model.get_input_embeddings() and m.num_embeddings < vocabulary]


def require_positions(model, tokens: int, what: str, fix: str) -> None:
    """An InputError when `tokens` are more than a model with learned position embeddings can
    read (torch's IndexError otherwise); `fix` may name the limit as {limit}."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and tokens > limit and learned_position_embeddings(model):
        raise InputError(f"{what} is {tokens} tokens, and the model reads at most {limit} (learned position "
                         f"embeddings: max_position_embeddings); {fix.format(limit=limit)}")


def text_model_shapes(model) -> list[tuple[int, ...]]:
    """The shapes of the weights a text GGUF holds: the language model and its head. A
    multimodal model's vision tower and projector go to llama.cpp's separate mmproj file.
    A weight llama.cpp's converter keeps in F32 whatever the type is given as 1-D, as the
    other F32 ones (norms, biases) are: learned position and token-type embeddings (GPT-2's
    `wpe`: 0.23 bits a weight of a Q8_0 file at 64 wide, 0.15 at GPT-2's size) and MoE routers."""
    import torch

    decoder = model.get_decoder()
    text = model.config.get_text_config()
    experts = next((getattr(text, key) for key in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(text, key, None)), None)
    kept_f32 = {id(module.weight) for module in learned_position_embeddings(model)}
    for name, module in decoder.named_modules():
        weight = getattr(module, "weight", None)
        if experts and name.rsplit(".", 1)[-1] in ("gate", "router") and isinstance(weight, torch.nn.Parameter) \
                and weight.dim() == 2 and weight.shape[0] == experts:
            kept_f32.add(id(weight))
    weights = {id(p): p for p in decoder.parameters()}
    for p in model.get_output_embeddings().parameters():  # an untied head (Phi-2's has a bias); a tied one is the decoder's embedding
        weights.setdefault(id(p), p)
    return [(p.numel(),) if key in kept_f32 else tuple(p.shape) for key, p in weights.items()]


def has_vision_tower(model) -> bool:
    """An image-text model (Gemma 3 4B-27B): a vision tower and projector beside the language model."""
    return getattr(model.config, "vision_config", None) is not None and hasattr(model, "get_image_features")


def probe_images(settings: dict) -> list:
    """Two fixed RGB images (H x W x 3 uint8) at the size an image processor with `settings`
    (its preprocessor_config.json) resizes to, so that neither HF nor llama.cpp resizes them:
    seeded noise (every patch differs) and a smooth colour gradient."""
    import numpy as np

    size = settings["size"]
    height, width = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                         (x + y) * 255 // max(1, height + width - 2)], axis=-1).astype(np.uint8)
    return [np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8), gradient]


def image_features(model, settings: dict, images: list) -> list:
    """The model's own embeddings of `images` (at the processor's size), as its language model
    receives them: pixels rescaled and normalised as the image processor's `settings` say,
    through the vision tower and the projector. One (image tokens x hidden) array each."""
    import numpy as np
    import torch

    mean, std = np.array(settings["image_mean"]), np.array(settings["image_std"])
    weight = next(model.parameters())
    features = []
    for image in images:
        pixels = (image * settings.get("rescale_factor", 1 / 255) - mean) / std
        tensor = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None].to(weight.device, weight.dtype)
        with torch.inference_mode():
            out = model.get_image_features(pixel_values=tensor)
        out = getattr(out, "pooler_output", out)
        features.append(out.float().reshape(-1, out.shape[-1]).cpu().numpy())
    return features


def base_transformer(model):
    """The model without its head (PEFT's LoRA layers stay in it): hidden states, no logits."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.base_model


class LogitHead:
    """The model's last step, final hidden state -> next-token logits: its output embedding
    and the logit post-processing its config declares (Gemma 2/3's final_logit_softcapping,
    Cohere's logit_scale, Granite's logits_scaling), in fp32, LOGIT_VALUES at a time.

    Built with a probe (a few token ids) on which the head must give the model's own logits:
    that settles whether the class applies what its config declares (Gemma3ForCausalLM
    applies final_logit_softcapping, Gemma3ForConditionalGeneration does not), and a model
    that post-processes its logits some other way is an error naming the fix, never a
    silently wrong loss.
    """

    PROBE_TOKENS = 16

    def __init__(self, model, *, probe: Sequence[int]):
        import torch

        config = model.config.get_text_config()
        self.embedding = model.get_output_embeddings()
        self.positions = max(1, LOGIT_VALUES // self.embedding.weight.shape[0])
        declared = (getattr(config, "final_logit_softcapping", None),
                    (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0))
        ids = torch.tensor([list(probe[: self.PROBE_TOKENS])], device=next(model.parameters()).device)
        with torch.inference_mode():
            own = model(input_ids=ids, use_cache=False).logits[0].float()
            hidden = base_transformer(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
        # fp32 agrees to rounding; 16-bit models post-process in 16 bits, the head in fp32
        tolerance = (1e-4 if self.embedding.weight.dtype == torch.float32 else 2e-2) * max(1.0, float(own.abs().max()))
        for self.softcap, self.scale in dict.fromkeys([declared, (None, 1.0)]):
            if float((own - self(hidden)).abs().max()) <= tolerance:
                return
        raise InputError(f"{type(model).__name__}: its logits are not its output embedding with the post-processing "
                         "factory knows (final_logit_softcapping, logit_scale, logits_scaling), so the answer loss and "
                         "the GGUF divergence check cannot be computed in bounded memory for it; set "
                         "evaluation.loss: false to skip the test loss")

    def __call__(self, hidden):
        import torch

        with torch.inference_mode():
            return self.logits(hidden)

    def logits(self, hidden):
        """The fp32 logits of `hidden`, differentiable (the training loss)."""
        import torch

        logits = self.embedding(hidden.to(self.embedding.weight.device)).float() * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def loss(self, hidden, labels):
        """(summed cross-entropy, argmax predictions) of `hidden` (positions x hidden) against
        `labels`, a bounded number of positions at a time (TRAINING_LOGIT_VALUES): each chunk's
        logits are recomputed in the backward pass instead of kept, so training never holds the
        logits of a whole batch's answers (Gemma 3, 8 x 2048 answer tokens: 17 GB in fp32)."""
        import torch
        from torch.utils.checkpoint import checkpoint

        def chunk_loss(h, y):
            logits = self.logits(h)
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum"), logits.detach().argmax(-1)

        step = max(1, TRAINING_LOGIT_VALUES // self.embedding.weight.shape[0])
        total, predicted = hidden.new_zeros((), dtype=torch.float32), []
        for start in range(0, len(hidden), step):
            part, argmax = checkpoint(chunk_loss, hidden[start : start + step], labels[start : start + step],
                                      use_reentrant=False)
            total, predicted = total + part, [*predicted, argmax]
        return total, torch.cat(predicted) if predicted else labels.new_zeros(0)

    def chunks(self, hidden):
        """(offset, fp32 logits) for `hidden` (positions x hidden), a bounded number of positions at a time."""
        for start in range(0, len(hidden), self.positions):
            yield start, self(hidden[start : start + self.positions])


CONFIG_KEYS_NOT_RESTORED = {"torch_dtype", "dtype", "quantization_config", "transformers_version", "_name_or_path"}


def complete_saved_files(source: str, out_dir: Path) -> list[str]:
    """Put back what transformers 5's save_pretrained leaves out of a saved model folder.

    llama.cpp's converter needs config.json's settings as the model's authors wrote them, the
    SentencePiece `tokenizer.model` (without it a Gemma or Llama-2 vocabulary is not
    recognised), `added_tokens_decoder` (without it the turn tokens become plain text in the
    GGUF and chat output never stops) and, for an image-text
    model, the image processor's settings (`preprocessor_config.json`: the vision projector
    file takes its normalisation from it). All are taken from the base model (`source`: a
    folder or a hub id). Returns what was restored.
    """
    import json
    import shutil

    from transformers.utils import cached_file

    def base_file(name: str) -> Path | None:
        found = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        return Path(found) if found else None

    restored = []
    # settings transformers 5 reads and then writes under other names or not at all (Pythia's
    # `rotary_pct`, which llama.cpp's converter needs); the merged weights' own type and a base
    # checkpoint's quantization do not describe the merged model
    base_model_config, model_config_path = base_file("config.json"), out_dir / "config.json"
    if base_model_config and model_config_path.exists():
        base = json.loads(base_model_config.read_text(encoding="utf-8"))
        config = json.loads(model_config_path.read_text(encoding="utf-8"))
        missing = {k: v for k, v in base.items() if k not in config and k not in CONFIG_KEYS_NOT_RESTORED}
        if missing:
            config.update(missing)
            model_config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            restored += [f"config.json:{k}" for k in missing]
    for name in ("tokenizer.model", "preprocessor_config.json", "processor_config.json"):
        found = base_file(name)
        if found and not (out_dir / name).exists():
            shutil.copyfile(found, out_dir / name)
            restored.append(name)
    base_config, config_path = base_file("tokenizer_config.json"), out_dir / "tokenizer_config.json"
    if base_config and config_path.exists():
        base = json.loads(base_config.read_text(encoding="utf-8"))
        config = json.loads(config_path.read_text(encoding="utf-8"))
        missing = {k: base[k] for k in ("added_tokens_decoder", "add_bos_token", "add_eos_token", "legacy",
                                         "add_prefix_space")
                   if k in base and k not in config}
        if missing:
            config.update(missing)
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            restored += [f"tokenizer_config.json:{k}" for k in missing]
    return restored


# safetensors' names of the float types a merged model can hold
_SAFETENSORS_FLOATS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def saved_float_types(folder: Path) -> list[str]:
    """The float types (torch names) of the tensors in a saved model folder, read from the
    safetensors headers alone."""
    from safetensors import safe_open

    found = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            found |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return sorted(_SAFETENSORS_FLOATS[t] for t in found if t in _SAFETENSORS_FLOATS)


def cast_saved_weights(folder: Path, dtype: str) -> list[str]:
    """Rewrite, one file at a time, the safetensors files of a saved model whose float tensors are
    of another type than `dtype`, and the config's dtype with them; returns the files rewritten.

    Unsloth's save_pretrained_merged writes the base checkpoint's own type, which is float32
    for some checkpoints (seen on an H200 with a float32 base): the merge is to be 16-bit.
    """
    import json
    import os

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    rewritten = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            types = {f.get_slice(name).get_dtype() for name in f.keys()}
        if not any(t in _SAFETENSORS_FLOATS and _SAFETENSORS_FLOATS[t] != dtype for t in types):
            continue
        target = getattr(torch, dtype)
        tensors = {name: t.to(target) if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else t
                   for name, t in load_file(path).items()}
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
        rewritten.append(path.name)
        del tensors
    if rewritten:
        index = folder / "model.safetensors.index.json"
        if index.is_file():  # total_size is the tensors' bytes, now fewer
            data = json.loads(index.read_text(encoding="utf-8"))
            data.setdefault("metadata", {})["total_size"] = sum(_tensor_bytes(p) for p in folder.glob("*.safetensors"))
            index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))

        def retype(section: dict) -> None:  # the text and vision sub-configs carry their own
            for key, value in section.items():
                if key in ("dtype", "torch_dtype") and value in _SAFETENSORS_FLOATS.values():
                    section[key] = dtype
                elif isinstance(value, dict):
                    retype(value)

        retype(config)
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return rewritten


def _tensor_bytes(path: Path) -> int:
    """The bytes of a safetensors file's tensors: the file less its 8-byte length and header."""
    with path.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def local_model_inputs(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    """The base model folder when it is local: part of a phase's fingerprint."""
    path = ws.path(cfg.model.name)
    return [path] if path.is_dir() else []


def second_test_set(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    """The optional extra test file of evaluation.second_test_set: part of a fingerprint."""
    return [ws.path(cfg.evaluation.second_test_set)] if cfg.evaluation.second_test_set else []
