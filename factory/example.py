"""A self-contained, offline example: a learnable localization task and a tiny model.

`factory init --example DIR` builds a workspace with everything the pipeline needs and no
download: raw records of an objective task (data/raw/), and a randomly initialised
Gemma3ForCausalLM of about 530k parameters with a SentencePiece tokenizer trained on the
spot and the real Gemma 3 chat template (models/base/). It is an ordinary Hugging Face
folder, so every phase treats it exactly like `google/gemma-3-*`: the same architecture,
special tokens, chat template and file layout, only tiny and untrained.

`--family` picks another family (FAMILIES): Gemma 3 with a vision tower (as 4B-27B are),
Llama 3.1, Qwen 2.5, Qwen 3, DeepSeek-R1-Distill-Llama, Mistral or Phi-3, each
from its real model's config.json with tiny sizes, its real tokenizer (factory.real_tokenizers)
and its real chat template. build_custom_template_model makes, for tests, a model with a
template of its own that no table knows.

The task: render a date and an amount of money the way a locale writes them.

    instruction: "Format the date and amount for the locale."
    input:       "Locale: de-DE. Date: 2024-03-07. Amount: 1234.50 EUR."
    output:      "07.03.2024 | 1.234,50 €"

Every answer is a deterministic function of the request, so exact match is a fair score;
the values are drawn at random, so test requests were never seen in training and a model
has to learn the rule, not the pairs. The untrained base model scores 0; LoRA on CPU
learns it in about two minutes, or a three-locale variant (QUICK_LOCALES) in under one.

torch, transformers and sentencepiece are imported inside the functions: the data phases
and the CLI work without the `train` extra.
"""

from __future__ import annotations

import calendar
import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.chat import read_named_template

# --- the task --------------------------------------------------------------------------

INSTRUCTION = "Format the date and amount for the locale."

CURRENCY_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£"}


# locale: (date order, date separator, thousands separator, decimal separator, symbol after)
# Simplified CLDR conventions. French uses a plain space where CLDR has U+202F, so that the
# answers stay easy to type and compare.
LOCALES: dict[str, tuple[str, str, str, str, bool]] = {
    "en-US": ("MDY", "/", ",", ".", False),
    "en-GB": ("DMY", "/", ",", ".", False),
    "de-DE": ("DMY", ".", ".", ",", True),
    "fr-FR": ("DMY", "/", " ", ",", True),
    "it-IT": ("DMY", "/", ".", ",", True),
    "ja-JP": ("YMD", "/", ",", ".", False),
}


def format_request(locale: str, date: str, amount: str, currency: str) -> str:
    """The user's request (the Alpaca `input`): `date` is ISO, `amount` has two decimals."""
    return f"Locale: {locale}. Date: {date}. Amount: {amount} {currency}."


def localize(locale: str, date: str, amount: str, currency: str) -> str:
    """The answer: `DATE | AMOUNT` written the locale's way. The reference implementation."""
    order, date_sep, group_sep, decimal_sep, symbol_after = LOCALES[locale]
    year, month, day = date.split("-")
    parts = {"Y": year, "M": month, "D": day}
    local_date = date_sep.join(parts[c] for c in order)
    whole, cents = amount.split(".")
    groups = []
    while whole:
        groups.insert(0, whole[-3:])
        whole = whole[:-3]
    number = group_sep.join(groups) + decimal_sep + cents
    symbol = CURRENCY_SYMBOLS[currency]
    money = f"{number} {symbol}" if symbol_after else f"{symbol}{number}"
    return f"{local_date} | {money}"


def _random_case(rng: random.Random, locales: list[str]) -> tuple[str, str, str, str]:
    locale = rng.choice(locales)
    year = rng.randint(1990, 2035)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    digits = rng.randint(1, 6)  # 0.05 .. 999999.99, every length equally likely
    whole = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
    amount = f"{whole}.{rng.randint(0, 99):02d}"
    currency = rng.choice(sorted(CURRENCY_SYMBOLS))
    return locale, f"{year:04d}-{month:02d}-{day:02d}", amount, currency


def generate_task_records(n: int, seed: int = 0, *, locales: list[str] | None = None) -> list[dict[str, Any]]:
    """`n` distinct Alpaca records {instruction, input, output} of the localization task.

    Alpaca because it is the most common raw format and it keeps the fixed task
    description (instruction) apart from the specific request (input); the format phase
    turns it into a system turn plus a user turn, which the Gemma template renders as one
    user turn "instruction\\n\\ninput". Requests are unique, so no split shares a prompt.

    `locales` narrows the task to some of LOCALES: fewer, more distinct locales (e.g.
    en-US, de-DE, ja-JP: three date orders) learn in fewer steps, for a quick test.
    """
    names = sorted(LOCALES) if locales is None else list(locales)
    unknown = [x for x in names if x not in LOCALES]
    if unknown or not names:
        raise ValueError(f"unknown locale(s) {unknown}; known: {', '.join(sorted(LOCALES))}")
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    while len(records) < n:
        case = _random_case(rng, names)
        request = format_request(*case)
        if request in seen:
            continue
        seen.add(request)
        records.append({"instruction": INSTRUCTION, "input": request, "output": localize(*case)})
    return records


def check_answer(record: dict[str, Any], answer: str) -> bool:
    """Exact match after trimming, the metric the example is meant to be scored by."""
    return answer.strip() == str(record["output"]).strip()


REQUEST = re.compile(r"Locale: ([A-Za-z]{2}-[A-Za-z]{2})\. Date: (\d{4}-\d{2}-\d{2})\. Amount: (\d+\.\d{2}) ([A-Z]{3})\.")


def judge(item: dict[str, Any]) -> dict[str, float]:
    """The task's rubric as code, for `evaluation.judge.model: factory.example:judge`.

    Every request of the item (its one answer, or each user turn of a conversation with the
    reply that followed) is checked against the reference implementation; the criterion
    scores are the shares of requests whose date and whose amount are right. An item with no
    request of this task in it cannot be judged (the judge counts it as a failure).
    """
    messages = item["messages"]
    if item.get("answer") is not None:
        exchanges = [(messages[-1]["content"] if messages else "", item["answer"])]
    else:
        exchanges = [(m["content"], reply["content"]) for m, reply in zip(messages, messages[1:])
                     if m["role"] == "user" and reply["role"] == "assistant"]
    dates, amounts = [], []
    for request, answer in exchanges:
        match = REQUEST.search(request)
        if match is None or match.group(1) not in LOCALES or match.group(4) not in CURRENCY_SYMBOLS:
            continue
        expected_date, expected_amount = localize(*match.groups()).split(" | ")
        got = answer.strip().split(" | ")
        dates.append(float(got[0].strip() == expected_date))
        amounts.append(float(len(got) == 2 and got[1].strip() == expected_amount))
    if not dates:
        raise ValueError("no request of the localization task in this item")
    return {"date": sum(dates) / len(dates), "amount": sum(amounts) / len(amounts)}


# --- the tiny Gemma 3 ------------------------------------------------------------------

# Gemma's special pieces, in Gemma's order (ids 0..4); the turn markers follow at 5 and 6
# (105 and 106 in the real vocabulary).
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID, START_OF_TURN_ID, END_OF_TURN_ID = range(7)

# Gemma 3 4B-27B's image tokens: begin and end of an image, and the placeholder each image
# embedding takes the place of.
IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]

# Text the tokenizer must cover besides the corpus: the turn headers the template writes.
TEMPLATE_TEXTS = ["<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n", "<start_of_turn>system\n"]


GEMMA_CONTROL = {"pad": (PAD_ID, "<pad>"), "eos": (EOS_ID, "<eos>"), "bos": (BOS_ID, "<bos>"), "unk": (UNK_ID, "<unk>")}


def train_sentencepiece(corpus: list[str], vocab_size: int = 400, *, control: dict[str, tuple[int, str]] = GEMMA_CONTROL,
                        user_defined: list[str] = SPECIAL_TOKENS[4:], extra_texts: list[str] = TEMPLATE_TEXTS) -> bytes:
    """A SentencePiece BPE model proto trained on `corpus` (and `extra_texts`), shaped like Gemma's.

    Byte fallback (any text encodes), no dummy prefix, identity normalization (newlines and
    runs of spaces survive), digits split one per token (as Gemma does; it also makes the
    number task learnable by a tiny model), the `control` pieces at their ids (Gemma's pad,
    eos, bos, unk; a role left out has none), and the `user_defined` pieces (the turn
    markers), so that they tokenize from text. 256 byte pieces, the special pieces and the
    corpus's characters come first; `vocab_size` is a soft upper bound.
    """
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    lines = [text for text in corpus if text] + extra_texts
    ids = {f"{role}_id": control.get(role, (-1, ""))[0] for role in ("pad", "eos", "bos", "unk")}
    pieces = {f"{role}_piece": piece for role, (_, piece) in control.items()}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        add_dummy_prefix=False,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        character_coverage=1.0,
        max_sentence_length=1 << 16,
        **ids,
        **pieces,
        user_defined_symbols=user_defined,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    return buffer.getvalue()


def build_tiny_gemma3(
    out_dir: Path,
    *,
    corpus: list[str],
    seed: int = 0,
    hidden: int = 64,
    layers: int = 6,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    intermediate: int = 256,
    vocab_size: int = 400,
    initializer_range: float = 0.3,
    max_positions: int = 1024,
    sliding_window: int = 512,
    padded_vocab: int | None = None,
    save_dtype: str = "float32",
    vision: bool = False,
) -> Path:
    """Write a randomly initialised Gemma3ForCausalLM with a tokenizer trained on `corpus`.

    The folder is what `save_pretrained` writes for a real Gemma 3, plus what transformers 5
    leaves out: tokenizer.model (llama.cpp's converter reads it) and added_tokens_decoder in
    tokenizer_config.json (it marks the turn tokens as control tokens in a GGUF), and a
    generation_config.json that stops at <eos> or <end_of_turn> like Gemma 3 -it does.
    `initializer_range` 0.3 (not Gemma's 0.02) gives the frozen random weights enough scale
    for LoRA to learn the task in a few hundred steps (0.1 needs about twice as many, 0.02
    barely moves).
    `padded_vocab` gives the model a larger embedding than the tokenizer needs (a real
    Gemma 3's 262,144, for benchmarks at real size); `save_dtype` is the checkpoint's dtype.
    `vision` makes it a Gemma3ForConditionalGeneration, as google/gemma-3-4b-it (and 12B, 27B)
    is: the same language model, with a tiny SigLIP vision tower and projector beside it, and
    the image tokens after the tokenizer's, as in the real vocabulary.
    Returns `out_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig
    from transformers.models.gemma import GemmaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # tokenizer: transformers converts tokenizer.model when it loads a folder that has only it
    proto = train_sentencepiece(corpus, vocab_size=vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(proto)
        tokenizer = GemmaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
    tokenizer.chat_template = read_named_template("gemma-3")
    real_vocab = len(tokenizer)
    if vision:  # after the text vocabulary, as in google/gemma-3-4b-it's (there 255999, 256000, 262144)
        tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)

    # model
    config = Gemma3TextConfig(
        vocab_size=padded_vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=max_positions,
        sliding_window=sliding_window,
        initializer_range=initializer_range,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # the tokenizer's; the generation config adds <end_of_turn>
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if vision:
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

        tower = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=IMAGE_SIZE, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False)
        config = Gemma3Config(text_config=config, vision_config=tower, mm_tokens_per_image=1,
                              boi_token_index=real_vocab, eoi_token_index=real_vocab + 1,
                              image_token_index=real_vocab + 2, tie_word_embeddings=True)
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():  # transformers starts the projector at zero: every image would embed as 0
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, initializer_range)
    else:
        model = Gemma3ForCausalLM(config)
    model = model.to(getattr(torch, save_dtype)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, END_OF_TURN_ID], pad_token_id=PAD_ID, do_sample=False
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # what transformers 5 does not write
    (out_dir / "tokenizer.model").write_bytes(proto)
    _restore_tokenizer_config(out_dir / "tokenizer_config.json", image_tokens_from=real_vocab if vision else None)
    if vision:  # what AutoProcessor (and Unsloth's FastModel) loads as a Gemma3Processor
        _write_as_hub_checkpoint(out_dir / "model.safetensors")
        tokens_per_image = model.config.mm_tokens_per_image
        (out_dir / "preprocessor_config.json").write_text(json.dumps(
            {**GEMMA3_PREPROCESSOR, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
             "image_seq_length": tokens_per_image}, indent=2) + "\n", encoding="utf-8")
        (out_dir / "processor_config.json").write_text(json.dumps(
            {"image_seq_length": tokens_per_image, "processor_class": "Gemma3Processor"}, indent=2) + "\n",
            encoding="utf-8")

    # it must load back the ordinary way
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    AutoModelForCausalLM.from_pretrained(out_dir)
    ids = reloaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    if list(ids[:2]) != [BOS_ID, START_OF_TURN_ID]:
        raise RuntimeError(f"tiny Gemma 3 tokenizer renders the chat template wrong: {ids}")
    return out_dir


IMAGE_SIZE = 28  # the tiny vision tower's input: 2 x 2 patches of 14 pixels

# google/gemma-3-4b-it's preprocessor_config.json but for the size; llama.cpp's converter reads
# the normalisation from it when it writes the vision projector (mmproj) file.
GEMMA3_PREPROCESSOR = {
    "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
    "pan_and_scan_min_ratio_to_activate": None, "processor_class": "Gemma3Processor", "resample": 2,
    "rescale_factor": 1 / 255,
}


def _write_as_hub_checkpoint(path: Path) -> None:
    """Name the vision tower's weights as google/gemma-3-4b-it's checkpoint does
    (vision_tower.vision_model.*): transformers 5 writes a model built from a config without
    the `vision_model` level, which no released checkpoint has and llama.cpp cannot map.
    (A model loaded from hub names is saved with them, so a merged fine-tune keeps them.)"""
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    save_file({name.replace("vision_tower.", "vision_tower.vision_model.", 1): tensor for name, tensor in weights.items()},
              path, metadata={"format": "pt"})


def _restore_tokenizer_config(path: Path, *, image_tokens_from: int | None = None) -> None:
    """Add what a google/gemma-3 tokenizer_config.json has and transformers 5 leaves out; with
    `image_tokens_from`, the image tokens from that id on, and their names, as 4B-27B have."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("vocab_file", None)  # an absolute path to the temporary folder
    config.update(add_bos_token=True, add_eos_token=False, chat_template=read_named_template("gemma-3"))
    specials = dict(enumerate(SPECIAL_TOKENS))
    if image_tokens_from is not None:
        specials.update(enumerate(IMAGE_TOKENS, start=image_tokens_from))
        config.update(boi_token=IMAGE_TOKENS[0], eoi_token=IMAGE_TOKENS[1], image_token=IMAGE_TOKENS[2])
    config["added_tokens_decoder"] = {
        str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i, tok in specials.items()
    }
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- the other model families ---------------------------------------------------------

# The sizes every tiny model gets; the real model's other settings stay (vocabulary, tied or
# untied embeddings, RoPE, norms, special token ids). Heads keep the real ratio of query to
# key/value heads (grouped-query or not). initializer_range 0.3, as the tiny Gemma's, gives
# the frozen random weights enough scale for LoRA to learn.
TINY_SIZES = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "head_dim": 16, "initializer_range": 0.3}


@dataclass(frozen=True)
class Family:
    """How the example builds a tiny model of one family: the real model's own files (config.json,
    generation_config.json, tokenizer_config.json), written down here, its vocabulary and its
    chat template. Only `factory init --example` and the tests read this; the pipeline reads
    the model folder, as it would a downloaded one."""

    real_model: str
    """The model whose files these are (Hugging Face id)."""
    vocab: str | None
    """Its vocabulary among llama.cpp's (factory.real_tokenizers); None for Gemma 3, whose
    tokenizer is trained on the task's texts (build_tiny_gemma3)."""
    template: str
    """Its chat template: factory/templates/<template>.jinja."""
    config: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    """tokenizer_config.json without added_tokens_decoder and chat_template, which the builder
    writes from the tokenizer and the template."""
    added_tokens: dict[int, tuple[str, bool]] = field(default_factory=dict)
    """The model's added tokens where they differ from its vocabulary's: id -> (content, special)."""
    tokenizer_json: dict[str, Any] = field(default_factory=dict)
    """Top-level entries of tokenizer.json where the model's differ from its vocabulary's."""
    vision: bool = False
    """A multimodal model (a vision tower beside the language model); Gemma 3 only."""
    steps: int = 1000
    """Training steps in the example's factory.yaml (`factory init --example`, 4,200 records):
    for a family whose tiny model learns the task, enough that it does on most draws of the
    split measured."""


def _llama31_added_tokens() -> dict[int, tuple[str, bool]]:
    """Llama 3.1 named eight of the 256 special tokens (llama-bpe has Llama 3.0's names) and
    numbers the remaining reserved ones from 0."""
    named = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
             128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
             128010: "<|python_tag|>"}
    reserved = iter(range(256))
    return {i: (named.get(i) or f"<|reserved_special_token_{next(reserved)}|>", True) for i in range(128000, 128256)}


# Qwen 2.5's 22 added tokens from 151643 (qwen2 has Qwen 2's first three); the tool-call and
# fill-in-the-middle ones are not special.
QWEN25_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

# Qwen 3 adds four more, none special: tool responses and the reasoning block.
QWEN3_ADDED = [*QWEN25_ADDED, "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Phi-3 does not mark </s> special; its chat tokens (<|user|>, <|end|>, ...) are phi-3's own.
# The real ones also strip the whitespace that follows them (rstrip), but llama.cpp strips it
# only in a GGUF whose general.name contains "phi3" or "phi-3", which its converter does not
# write (it names the file "Phi 3 ..."), and would then disagree with transformers on every
# chat turn: the example's tokens keep the whitespace, in both.
PHI3_ADDED = {2: ("</s>", False)}

# SentencePiece without the space prefix (Mistral's add_prefix_space false), as transformers
# writes it for a LlamaTokenizer.
SPM_NO_PREFIX = {
    "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": False},
    "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                 {"type": "ByteFallback"}, {"type": "Fuse"}]},
}

# Llama-3.1-8B's config.json (the Instruct model's and DeepSeek-R1-Distill-Llama-8B's differ
# in their end-of-sequence ids only).
LLAMA31_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
                  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
                  "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                  "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 128000}

# SentencePiece tokenizers load with `legacy: true`: a space prefix after every special token,
# as SentencePiece itself, transformers 4's tokenizer.json and llama.cpp tokenize. transformers
# 5 with `legacy: false` leaves it out after special tokens, and the same text then gets other
# ids in the GGUF than in training.
FAMILIES: dict[str, Family] = {
    "gemma-3": Family("google/gemma-3-1b-it", vocab=None, template="gemma-3"),
    # What seed 004's default model is: Gemma 3 4B, 12B and 27B are image-text models.
    "gemma-3-vision": Family("google/gemma-3-4b-it", vocab=None, template="gemma-3", vision=True),
    "llama-3.1": Family(
        "meta-llama/Llama-3.1-8B-Instruct", vocab="llama-bpe", template="llama-3.1",
        config={**LLAMA31_CONFIG, "eos_token_id": [128001, 128008, 128009]},
        generation={"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": True,
                    "temperature": 0.6, "top_p": 0.9},
        tokenizer={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                   "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072},
        added_tokens=_llama31_added_tokens()),
    "qwen-2.5": Family(
        "Qwen/Qwen2.5-7B-Instruct", vocab="qwen2", template="qwen-2.5",
        config={"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064,
                "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
                "max_window_layers": 28, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645},
        generation={"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                    "do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
        tokenizer={"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
                   "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                   "additional_special_tokens": QWEN25_ADDED[1:14], "clean_up_tokenization_spaces": False,
                   "errors": "replace", "model_max_length": 131072, "split_special_tokens": False},
        added_tokens={151643 + i: (t, i < 14) for i, t in enumerate(QWEN25_ADDED)}),
    # Qwen 3's template writes a reasoning block (<think>...</think>) before the last answer only,
    # so it is not prefix-preserving: its masks come from TRL's training variant of it.
    "qwen-3": Family(
        "Qwen/Qwen3-0.6B", vocab="qwen2", template="qwen-3",
        config={"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
                "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960,
                "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_scaling": None, "sliding_window": None,
                "use_sliding_window": False, "max_window_layers": 28, "attention_bias": False,
                "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645},
        generation={"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                    "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20},
        tokenizer={"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
                   "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                   "additional_special_tokens": QWEN25_ADDED[1:14], "clean_up_tokenization_spaces": False,
                   "errors": "replace", "model_max_length": 131072, "split_special_tokens": False},
        added_tokens={151643 + i: (t, i < 14) for i, t in enumerate(QWEN3_ADDED)},
        # its output embedding is its input embedding, frozen: it learns slower. With --vocab task,
        # 1,000 steps: exact match 0.995 or 0.82 depending on the split's draw, Q4_K_M then 14.5%
        # below the merged model; 1,500 steps, split seeds 3406-3408: 0.995, 1.0, 0.995, Q4_K_M
        # no lower; seed 3409: 0.07, the copy not learnt yet (BENCHMARKS.md)
        steps=1500),
    # Llama 3.1's architecture and vocabulary with DeepSeek's turn tokens in its reserved ids, and a
    # tokenizer_config.json that names LlamaTokenizerFast (transformers 5 would load that as a
    # SentencePiece tokenizer: modeling.load_tokenizer); the template opens the reasoning block
    # in every generation prompt and drops the reasoning of every answer (TRL's variant keeps it).
    "deepseek-r1": Family(
        "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", vocab="llama-bpe", template="deepseek-r1",
        config={**LLAMA31_CONFIG, "eos_token_id": 128001},  # Llama-3.1-8B's, which it is distilled into
        generation={"bos_token_id": 128000, "eos_token_id": 128001, "do_sample": True, "temperature": 0.6,
                    "top_p": 0.95},
        tokenizer={"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "add_eos_token": False,
                   "bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                   "pad_token": "<｜end▁of▁sentence｜>", "unk_token": None, "legacy": True,
                   "clean_up_tokenization_spaces": False, "use_default_system_prompt": False,
                   "model_max_length": 16384},
        added_tokens={**_llama31_added_tokens(), 128000: ("<｜begin▁of▁sentence｜>", True),
                      128001: ("<｜end▁of▁sentence｜>", True), 128011: ("<｜User｜>", False),
                      128012: ("<｜Assistant｜>", False), 128013: ("<think>", False), 128014: ("</think>", False),
                      128015: ("<｜▁pad▁｜>", True)}),
    # llama.cpp has no Mistral vocabulary: Llama 2's stands in, a SentencePiece BPE model of the
    # same size, byte fallback and special ids (<unk> <s> </s> = 0 1 2) as Mistral 7B v0.1's.
    # add_prefix_space false: the template writes the space before [INST] and the answer itself,
    # so the ids are Mistral's ("▁[INST]"), in transformers and in llama.cpp alike.
    "mistral": Family(
        "mistralai/Mistral-7B-Instruct-v0.1", vocab="llama-spm", template="mistral",
        config={"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 32000,
                "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2},
        generation={"bos_token_id": 1, "eos_token_id": 2},
        tokenizer={"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "add_prefix_space": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "pad_token": None, "legacy": True, "clean_up_tokenization_spaces": False,
                   "spaces_between_special_tokens": False, "model_max_length": 32768},
        tokenizer_json=SPM_NO_PREFIX),
    "phi-3": Family(
        "microsoft/Phi-3-mini-4k-instruct", vocab="phi-3", template="phi-3",
        config={"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": 32064,
                "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
                "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
                "rope_scaling": None, "sliding_window": 2047, "attention_bias": False, "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000},
        generation={"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000},
        tokenizer={"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
                   "legacy": True, "clean_up_tokenization_spaces": False, "padding_side": "left",
                   "model_max_length": 4096},
        added_tokens=PHI3_ADDED),
}
DEFAULT_FAMILY = "gemma-3"

# For tests: a pretrained model of another kind, with a chat template of its own that is none
# of the named ones: Llama 2's architecture and SentencePiece tokenizer, no pad token, and an
# Alpaca-like template that writes <s> itself, puts the answer header in the user's turn (so
# add_generation_prompt changes nothing) and ends each answer with </s> and a blank line.
CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ '### Question:\\n' + message['content'] + '\\n\\n### Answer:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
)
CUSTOM_TEMPLATE_MODEL = Family(
    "meta-llama/Llama-2-7b-hf", vocab="llama-spm", template="",
    config={"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    generation={"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9},
    tokenizer={"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": True,
               "clean_up_tokenization_spaces": False, "model_max_length": 4096})


# For tests: a base model of an older kind, as GPT-2, Pythia and OPT are: learned position
# embeddings, Conv1D layers whose names are none of Llama's, one token that is both BOS and EOS,
# no chat template and no pad token. Its files are openai-community/gpt2's.
GPT2_BASE_MODEL = Family(
    "openai-community/gpt2", vocab="gpt-2", template="",
    config={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_embd": 768,
            "n_layer": 12, "n_head": 12, "n_ctx": 1024, "n_positions": 1024, "activation_function": "gelu_new",
            "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "layer_norm_epsilon": 1e-05,
            "bos_token_id": 50256, "eos_token_id": 50256},
    generation={"bos_token_id": 50256, "eos_token_id": 50256},
    tokenizer={"model_max_length": 1024})


def build_family_model(out_dir: Path, family: Family, *, seed: int = 0, chat_template: str | None = None,
                       task_records: list[dict[str, Any]] | None = None) -> Path:
    """Write a randomly initialised tiny model of `family` with its real tokenizer and template.

    The tokenizer files come from factory.real_tokenizers (built once per machine), with the
    family's special tokens and tokenizer_config.json; the model is the family's architecture
    from its real config.json with TINY_SIZES; generation_config.json is the real one. Like a
    downloaded model, the template is in tokenizer_config.json, and for SentencePiece families
    tokenizer.model is there for llama.cpp's converter. `chat_template` replaces the family's.
    With `task_records` (Alpaca rows), the vocabulary is the task's instead (task_vocabulary),
    and the model has TASK_VOCABULARY_SIZES. Returns `out_dir`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from factory import real_tokenizers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    template = chat_template if chat_template is not None else family.template and read_named_template(family.template)

    real_tokenizers.copy_files(family.vocab, out_dir)
    spec_path = out_dir / "tokenizer.json"
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    added = {t["id"]: t for t in spec["added_tokens"]}
    for token_id, (content, special) in family.added_tokens.items():
        added[token_id] = {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                           "normalized": False, "special": special}
    spec["added_tokens"] = [added[i] for i in sorted(added)]
    spec.update(family.tokenizer_json)
    spec_path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    decoder = {str(i): {k: v for k, v in t.items() if k != "id"} for i, t in sorted(added.items())}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {**family.tokenizer, "added_tokens_decoder": decoder, **({"chat_template": template} if template else {})},
        indent=2, ensure_ascii=False
    ) + "\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)

    real, generation = family.config, family.generation
    sizes = dict(TINY_SIZES)  # GPT-2's config takes these names for its own (n_embd, n_layer, n_head)
    if "num_key_value_heads" in real:
        sizes["num_key_value_heads"] = max(1, sizes["num_attention_heads"] * real["num_key_value_heads"]
                                           // real["num_attention_heads"])
    if task_records is not None:
        renumber = task_vocabulary(out_dir, tokenizer, task_records)
        real, generation = renumber(real), renumber(generation)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        sizes.update(TASK_VOCABULARY_SIZES, vocab_size=len(tokenizer))
    config = AutoConfig.for_model(**{**real, **sizes})
    if config.vocab_size < len(tokenizer):
        raise RuntimeError(f"{family.real_model}: vocabulary {config.vocab_size} < tokenizer {len(tokenizer)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(out_dir)
    return out_dir


# The task vocabulary's model: 6 layers, as the tiny Gemma's, and rope_theta 10,000: at the
# example's 128 tokens, the 1,000,000 of Qwen 3 and Llama 3.1 barely turns the slow half of the
# rotary pairs, and the copy is not learnt (Qwen 3, 1,000 steps: exact match 0.09 at 1,000,000,
# 0.75 at 10,000; 4 layers at 10,000: 0.46).
TASK_VOCABULARY_SIZES = {"num_hidden_layers": 6, "rope_theta": 10000.0}


def task_vocabulary(out_dir: Path, tokenizer, records: list[dict[str, Any]]):
    """Replace the real `tokenizer` in `out_dir` with a SentencePiece vocabulary trained on
    `records` as its template renders them (about 400 pieces, like the Gemma example's, besides
    the family's special and added tokens), keeping each of those, by name, as a piece of its
    own with the same special flag (so llama.cpp marks them as control tokens). The template,
    the tokenizer_config.json settings and which tokens are BOS, EOS and pad stay the family's.

    Returns a function that renumbers the special token ids of a config.json or
    generation_config.json dict from the real vocabulary to this one."""
    from transformers import LlamaTokenizer

    added = sorted(tokenizer.added_tokens_decoder.items())
    unk = tokenizer.unk_token or "<unk>"
    texts = [tokenizer.apply_chat_template(task_messages(r), tokenize=False) for r in records]
    kept = [t.content for _, t in added if t.content != unk]
    proto = train_sentencepiece(texts, 400 + len(kept), control={"unk": (0, unk)}, user_defined=kept, extra_texts=[])
    roles = {role: getattr(tokenizer, f"{role}_token") for role in ("bos", "eos", "pad")}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(proto)
        task = LlamaTokenizer.from_pretrained(tmp, legacy=True, add_prefix_space=False, unk_token=unk,
                                              **{f"{role}_token": token for role, token in roles.items()})
    special = {t.content for _, t in added if t.special} | {unk}
    spec = json.loads(task.backend_tokenizer.to_str())
    for token in spec["added_tokens"]:
        token.update(special=token["content"] in special, normalized=False)
    spec.update(SPM_NO_PREFIX)
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (out_dir / "tokenizer.model").write_bytes(proto)
    config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in spec["added_tokens"]}
    # a SentencePiece model now, whatever the family's was, and without the dummy prefix
    config.update(tokenizer_class="LlamaTokenizer", add_prefix_space=False)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
    new_ids = {t["content"]: t["id"] for t in spec["added_tokens"]}

    def renumber(settings: dict[str, Any]) -> dict[str, Any]:
        def one(token_id: int) -> int:
            return new_ids[tokenizer.convert_ids_to_tokens(token_id)]

        return {key: ([one(i) for i in value] if isinstance(value, list) else one(value))
                if key.endswith("token_id") and value is not None else value for key, value in settings.items()}

    return renumber


def task_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """An Alpaca row of the example as a chat: instruction and input, then the output."""
    user = "\n\n".join(str(record[k]).strip() for k in ("instruction", "input") if record.get(k))
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(record["output"]).strip()}]


def build_custom_template_model(out_dir: Path, *, seed: int = 0) -> Path:
    """CUSTOM_TEMPLATE_MODEL, for tests: a model whose template no table knows."""
    return build_family_model(out_dir, CUSTOM_TEMPLATE_MODEL, seed=seed, chat_template=CUSTOM_TEMPLATE)


def build_gpt2_base_model(out_dir: Path, *, seed: int = 0) -> Path:
    """GPT2_BASE_MODEL, for tests: a base model of another architecture, without a chat template."""
    return build_family_model(out_dir, GPT2_BASE_MODEL, seed=seed)


# --- the workspace ---------------------------------------------------------------------

RAW_FILE = "data/raw/localization.jsonl"
BASE_MODEL_DIR = "models/base"
# Measured on 2 cores, 1 torch thread, batch 16, lr 1e-2, LoRA r16/alpha32 on all linear
# layers, ~4000 train records: all six locales need about 1000 steps (110-130 s) to reach
# exact match 1.00 on every seed tried (500-600 steps: 0.24-1.00 depending on the seed);
# QUICK_LOCALES reach 0.93-1.00 in 480 steps (50-55 s).
QUICK_LOCALES = ["en-US", "de-DE", "ja-JP"]


def record_texts(records: list[dict[str, Any]]) -> list[str]:
    """The tokenizer's corpus: each Alpaca record as the Gemma template renders it (so that
    newlines and the turn markers are learnt in context), without <bos>."""
    return [f"<start_of_turn>user\n{user['content']}<end_of_turn>\n<start_of_turn>model\n{answer['content']}<end_of_turn>\n"
            for user, answer in map(task_messages, records)]


VOCABULARIES = ("real", "task")
"""What the example model's tokenizer is: the family's real vocabulary (llama.cpp's copy), or
one of about 400 pieces trained on the example's data, the family's special tokens kept
(Gemma 3's is always this: its real vocabulary is not among llama.cpp's)."""


def write_example_workspace(
    root: Path, *, records: int = 2500, seed: int = 0, locales: list[str] | None = None,
    family: str = DEFAULT_FAMILY, vocabulary: str = "real", **model_kwargs: Any,
) -> dict[str, Path]:
    """Write data/raw/localization.jsonl (`records` Alpaca rows) and models/base/ under `root`:
    a tiny model of `family` (a FAMILIES name) with its `vocabulary` (one of VOCABULARIES);
    `model_kwargs` go to build_tiny_gemma3 (Gemma 3 only).

    Returns {"raw": file, "model": folder}. The factory.yaml that points at them is the
    caller's business.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {vocabulary!r}; known: {', '.join(VOCABULARIES)}")
    root = Path(root)
    rows = generate_task_records(records, seed=seed, locales=locales)
    raw = root / RAW_FILE
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    model_dir = root / BASE_MODEL_DIR
    if model_dir.exists():
        shutil.rmtree(model_dir)
    if FAMILIES[family].vocab is None:
        build_tiny_gemma3(model_dir, corpus=record_texts(rows), seed=seed, vision=FAMILIES[family].vision, **model_kwargs)
    else:
        build_family_model(model_dir, FAMILIES[family], seed=seed, task_records=rows if vocabulary == "task" else None)
    return {"raw": raw, "model": model_dir}


def example_config(*, steps: int | None = None, family: str = DEFAULT_FAMILY) -> str:
    """factory.yaml for the example workspace: settings that learn the task on a CPU, in
    `steps` training steps (the family's own number by default)."""
    steps = FAMILIES[family].steps if steps is None else steps
    return f"""\
# Example workspace made by `factory init --example --family {family}`: a localization task and
# a tiny {FAMILIES[family].real_model} with random weights, all offline. `factory run` takes it from raw
# data to a verified GGUF.
data:
  inputs: [{RAW_FILE}]
  split: {{train: 0.9, val: 0.05, test: 0.05, seed: 3407}}

model:
  name: {BASE_MODEL_DIR}          # an ordinary Hugging Face folder, loaded like a hub model
  max_seq_length: 128
  load_in_4bit: false

lora:
  r: 16
  lora_alpha: 32
  use_gradient_checkpointing: false   # a tiny model: recomputation costs more than it saves

training:
  per_device_train_batch_size: 16
  gradient_accumulation_steps: 1
  warmup_steps: 10
  max_steps: {steps}
  learning_rate: 0.01               # high, because the base model is random
  weight_decay: 0.0
  optim: adamw_torch
  logging_steps: 10

save:
  gguf_quantization: [Q8_0, Q4_K_M]   # llama.cpp types, each checked against the merged model

evaluation:
  metrics: [exact_match, normalized_exact_match, token_f1, chrf]
  primary: exact_match
  max_new_tokens: 32
  batch_size: 64
  # `factory compare`: the base model against the fine-tuned GGUF, each on a local server, in
  # conversations with simulated users (15 personas x 3), judged by the task's rubric as code
  judge: {{rubric: correctness, model: factory.example:judge}}
  compare: {{max_tokens: 32}}
  conversations: {{requests_per_conversation: 2}}
"""
