"""factory.yaml: parsed and validated once, at the entry point, then passed in.

Each field's docstring is its reference documentation (`factory validate --explain` and the
README are built from them). Unknown keys are rejected with their full path and the closest
valid key, and every problem is reported in one message.

The sections `model`, `lora`, `training`, `dataset` and `save` are the training config of
the Unsloth integration spec (seed 004) and load as printed there.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.errors import ConfigError
from factory.io import load_yaml

Auto = Literal["auto"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# --- data phases -----------------------------------------------------------------------

InputFormat = Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion", "mapped", "text", "oasst"]

FieldPath = Union[int, str]
"""A field of a record: a name (`question`), a dotted path into nested objects and lists
(`answers.text[0]`, `instances[*].output`), or a 0-based column number for CSV/TSV."""


class InputSpec(Section):
    path: str = "data/raw"
    """A file or folder, relative to the workspace. Folders are read recursively
    (.json, .jsonl, .csv, .tsv, .txt, .parquet, and the text kinds compressed as .gz, .bz2 or
    .xz); hidden files are skipped, other files skipped with a warning and listed in the
    metrics. Or a Hugging Face dataset, `hf://datasets/OWNER/NAME[@REVISION][/PATTERN]`:
    without a pattern its train split's files (the default configuration's in the dataset
    card, else as the hub's loader names them), with one the
    files it matches (`hf://datasets/tatsu-lab/alpaca/data/*.parquet`); downloaded into the
    hub cache once, read from the cache with HF_HUB_OFFLINE=1."""

    format: InputFormat = "auto"
    """How to read the records: `auto` decides per file from its extension and its first
    records (a record that fits no format is rejected, not the file; JSON records of none of
    them whose fields name their roles, as Dolly's instruction/context/response, are read by
    those names, with a warning that shows the mapping); or one of alpaca,
    sharegpt, openai, prompt_completion, mapped (fields named in `mapping`), text (each .txt
    file is one document), oasst (OpenAssistant message trees, one tree per JSONL line, or
    the message table of oasst1/oasst2 on the hub, a message a row)."""

    records: str | None = None
    """Where the records are inside each JSON document (a JSON file, or each JSONL line), as a
    path with `[*]` for every element of a list: `data[*].paragraphs[*]` for SQuAD (each
    paragraph, with its `qas`). Default: the document itself (a JSON array: each element)."""

    messages: str | None = None
    """The field that holds each record's conversation, a list of messages ({role, content}, or
    ShareGPT's {from, value}), of exchanges ({input, output}: Capybara), or a transcript of
    `\\n\\nHuman: ` and `\\n\\nAssistant: ` turns (Anthropic's hh-rlhf), where it is not
    `messages` or `conversations`: `conversation` (lmsys-chat-1m, Capybara), `chosen`
    (preference data, to train on the chosen replies), `dialog`."""

    mapping: dict[Literal["system", "user", "assistant"], Union[FieldPath, list[FieldPath]]] | None = None
    """For `mapped` (and CSV/TSV): which field or column holds each role's text,
    e.g. {user: question, assistant: answer}. A field may be a path into nested data
    (`answers.text[0]`), a column number (CSV/TSV without header), or a list of fields joined
    by a blank line, empty ones left out ({user: [context, question]}). A path with `[*]` gives one record per
    element: {user: "qas[*].question", assistant: "qas[*].answers[0].text"}. Setting it
    implies format `mapped`."""

    header: bool = True
    """CSV/TSV: whether the first row names the columns. Without a header, `mapping` gives
    column numbers, e.g. {user: 0, assistant: 1}."""

    tree_paths: Literal["best", "all"] = "best"
    """oasst: which conversations a message tree gives: `best` follows the best-ranked reply
    at every turn (rank 0), `all` gives every root-to-leaf path. Deleted messages and
    messages that failed review are skipped; a path ends at its last assistant message."""

    transform: str | None = None
    """`module:function` called on every raw record (a dict) before it is read; it returns a
    record in any format this input reads, a list of them, or None to leave the record out
    (counted as `filtered`). The module is imported from the workspace folder or sys.path.
    An exception it raises rejects the record (reason `transform_error`)."""

    label_map: dict[str, str] | None = None
    """Replace the assistant field's value through this table, e.g. {"0": negative, "1": positive}
    for a classification label column. A value missing from the table is a rejected record."""

    system_prompt: str | None = None
    """A system turn added to every record read from this input."""

    user_template: str | None = None
    """Wrap the user text, e.g. "Sentiment of: {text}". `{text}` is replaced by the field's value."""

    meta: list[FieldPath] = Field(default_factory=list)
    """Fields of each source record to keep in the record's `meta` (names, paths or column
    numbers), e.g. [category] for Dolly: then `data.split.stratify: category` keeps each
    category's share in every split. A field a record lacks is left out of its meta; a key
    the format already puts there (an OpenAI record's `label`) keeps its value."""

    @property
    def mapped_fields(self) -> list[tuple[str, FieldPath]]:
        """(role, field) for every field `mapping` names, a role's list of fields one by one."""
        return [(role, field) for role, fields in (self.mapping or {}).items()
                for field in (fields if isinstance(fields, list) else [fields])]

    @model_validator(mode="after")
    def _mapping_means_mapped(self) -> "InputSpec":
        if self.messages is not None and (self.format not in ("auto", "openai", "sharegpt") or self.mapping):
            raise ValueError("`messages` names the conversation's field of openai or sharegpt records; it does not go "
                             "with a mapping or format " + repr(self.format))
        if self.format == "mapped" and not self.mapping:
            raise ValueError("format 'mapped' needs a `mapping`, e.g. {user: question, assistant: answer}")
        if self.mapping is not None and "assistant" not in self.mapping:
            raise ValueError("`mapping` must name the field for `assistant`")
        if self.mapping is not None and "user" not in self.mapping and "system" not in self.mapping:
            raise ValueError("`mapping` must name the field for `user`")
        if not self.header and not self.mapping:
            raise ValueError("`header: false` needs a `mapping` with column numbers, e.g. {user: 0, assistant: 1}")
        if self.transform is not None and (self.transform.count(":") != 1 or not all(self.transform.split(":"))):
            raise ValueError("`transform` must be 'module:function', e.g. my_transforms:to_chat")
        named = [("meta", field) for field in self.meta] + [(f"mapping.{role}", f) for role, f in self.mapped_fields]
        for key, field in named:
            if isinstance(field, int) and field < 0:
                raise ValueError(f"{key}: column numbers start at 0, got {field}")
        wildcard = {str(f).split("[*]")[0] for _, f in self.mapped_fields if "[*]" in str(f)}
        if len(wildcard) > 1:
            raise ValueError(f"mapping: fields with `[*]` must share one list (got {', '.join(sorted(wildcard))}[*])")
        return self


class SplitConfig(Section):
    train: float = Field(0.8, ge=0, le=1)
    """Fraction of records (after de-duplication) in data/splits/train.jsonl."""

    val: float = Field(0.1, ge=0, le=1)
    """Fraction in val.jsonl."""

    test: float = Field(0.1, ge=0, le=1)
    """Fraction in test.jsonl."""

    seed: int = 3407
    """The same seed and data give byte-identical splits."""

    stratify: str | None = None
    """Keep each split's mix of this field's values, e.g. the assistant answer of a
    classification task: `assistant` (the last assistant turn), or a key of the records'
    `meta`: `label` (OpenAI records' label, a mapped label's raw value) or a source field an
    input keeps with `meta: [field]`."""

    group_by_prompt: bool = True
    """Records that share a key go to the same split, so no test question was seen in
    training: the normalized text of any user turn, the whole prompt (system and user turns),
    or a near-duplicate user turn (dedup.near: group). Groups are the connected components
    over all these keys."""

    min_turn_words: int = Field(0, ge=0)
    """User turns with fewer words than this neither link records into one group nor count
    as leakage (they still count as part of a whole prompt). 0: every user turn counts, an
    empty or blank one too (records with one are then one group). Raise
    it (e.g. to 3) when short generic turns such as "continue" or "thanks" tie many
    conversations into one group (metrics/split.json lists the most shared turns)."""

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class DedupConfig(Section):
    exact: bool = True
    """Drop records identical to an earlier one."""

    normalized: bool = True
    """Drop records equal to an earlier one after normalization: Unicode NFKC, case folded,
    runs of whitespace made one space (and spaces between Chinese, Japanese or Thai letters
    ignored). Symbols, punctuation and digits are kept, so
    "x = a + b" and "x = a - b" stay distinct (conversation text only; `tools` and `meta`
    are ignored)."""

    near: Literal["group", "drop", "off"] = "group"
    """Near-duplicate user turns (MinHash over word n-grams, Jaccard >= near_threshold):
    `group` keeps them in one split, `drop` removes a record whose user turn near-duplicates
    an earlier kept record's (written to data/formatted/duplicates.jsonl with that record),
    `off` skips the search (the splits-ready check still measures them)."""

    near_threshold: float = Field(0.8, gt=0, le=1)
    """Estimated Jaccard similarity of two user turns' word n-gram sets at or above which
    they are near-duplicates; also the threshold of the near-duplicate leakage check."""

    ngram: int = Field(3, ge=1, le=10)
    """Words per shingle for near-duplicates (in Chinese, Japanese, Thai and other scripts
    written without spaces, each letter is a word). Turns shorter than this are compared
    exactly only."""


class DecontaminateConfig(Section):
    benchmarks: list[str] = Field(default_factory=list)
    """Benchmark test files (canonical, Alpaca, ShareGPT, OpenAI or any file `format` reads;
    paths relative to the workspace, or hub datasets: their test split, or the files a pattern
    names: hf://datasets/openai/gsm8k/main/test-*.parquet). Every record of every split is checked against their
    prompts: a shared run of `ngram` words, or the same normalized prompt or user turn."""

    action: Literal["remove", "report"] = "remove"
    """`remove`: contaminated train records are left out (written to
    data/formatted/contaminated.jsonl); `report`: only counted (the splits-ready gate then
    fails while any remain in train). Val and test hits are always reported, never removed."""

    ngram: int = Field(13, ge=3)
    """Words in a shared run that counts as contamination (13, as in the GPT-3 and Llama
    reports; a letter of a script without spaces, such as Chinese, is a word)."""


class DataConfig(Section):
    inputs: list[InputSpec] = Field(default_factory=lambda: [InputSpec()])
    """Where the raw data is: paths (strings) or objects with path, format, records, mapping,
    header, tree_paths, transform, label_map, system_prompt, user_template, meta."""

    split: SplitConfig = Field(default_factory=SplitConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    """Public benchmarks to keep out of training: a list of files, or {benchmarks, action, ngram}."""

    workers: int | None = Field(None, ge=1, le=64, exclude=True)
    """Worker processes for `format` and `split`. null (the default): one per CPU (at most 8)
    for a file of 64 MB or more, none below (starting them costs more than they save); 1 does
    all the work in the phase's process, with the least memory. The outputs are the same
    whatever the number, so changing it re-runs nothing."""

    @field_validator("inputs", mode="before")
    @classmethod
    def _paths_as_specs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            if not value:
                raise ValueError("list at least one input path, e.g. [data/raw]")
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _list_as_benchmarks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        return {"benchmarks": value} if isinstance(value, list) else value


# --- training (seed 004) ---------------------------------------------------------------


class ModelConfig(Section):
    name: str = "unsloth/gemma-3-4b-it"
    """A hub id or a local folder with a Hugging Face model (config.json, weights, tokenizer)."""

    max_seq_length: Union[int, Auto] = 2048
    """Longest training sequence in tokens; longer examples are truncated. `auto` follows the
    VRAM table of the spec."""

    dtype: str | None = None
    """null picks bfloat16 where supported, else float16 (float32 on CPU)."""

    load_in_4bit: bool = True
    """4-bit base weights (QLoRA). Needs CUDA; ignored with a warning elsewhere."""

    backend: Literal["auto", "unsloth", "hf"] = "auto"
    """`unsloth` (CUDA, fast 4-bit LoRA), `hf` (transformers + PEFT + TRL on CPU, Apple MPS or
    CUDA), or `auto`: unsloth when a CUDA device is present and unsloth imports, else hf."""


class LoraConfig(Section):
    r: Union[int, Auto] = 8
    """LoRA rank (8, 16, 32, 64, 128). `auto` follows the VRAM table."""

    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """The layers that get an adapter. `all-linear`: every linear layer of the parts the
    `finetune_*` settings select, except the output embedding, as PEFT's and Unsloth's
    `all-linear`: for Llama, Mistral, Qwen and Gemma exactly seed 004's `[q_proj, k_proj,
    v_proj, o_proj, gate_proj, up_proj, down_proj]`, for Phi-3 its fused `qkv_proj` and
    `gate_up_proj` too, for GPT-2 `c_attn`, `c_proj`, `c_fc`. A list names layers by the last
    part of their name, as PEFT's `target_modules` does."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Layers trained whole (not through LoRA) and saved with the adapter, PEFT's
    `modules_to_save`: `[lm_head, embed_tokens]` teaches a model new tokens or a new language
    (Unsloth's continued pretraining), or a randomly initialised model its output space. Each
    costs its full size in weights, gradients and Adam moments (vocabulary x hidden x 16 bytes:
    8.4 GB for Llama 3.1 8B's head). A tied input and output embedding stays tied."""

    bias: Literal["none", "all", "lora_only"] = "none"
    use_gradient_checkpointing: Union[bool, Literal["unsloth"]] = "unsloth"
    """`unsloth` uses Unsloth's offloaded checkpointing on that backend, plain checkpointing elsewhere."""

    finetune_vision_layers: bool = False
    """Put adapters on a multimodal model's vision tower and projector (Gemma 3 4B-27B, Llama
    3.2 Vision, Qwen 2.5 VL). Off: text data never reaches them, and the GGUF holds the
    language model only (the vision part is exported to llama.cpp's separate projector file)."""

    finetune_language_layers: bool = True
    """Put adapters on the language model's layers."""

    finetune_attention_modules: bool = True
    """Put adapters on attention projections (`target_modules` inside attention blocks)."""

    finetune_mlp_modules: bool = True
    """Put adapters on MLP projections (`target_modules` inside MLP blocks). These four
    settings select among `target_modules` alike on both backends, as Unsloth's do."""


Tracker = Literal["none", "tensorboard", "trackio", "wandb", "mlflow"]
Strategy = Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
SHARDING_STRATEGIES = ("fsdp", "deepspeed_zero3")  # shard the base weights: not with unsloth's 4-bit ones


class DistributedConfig(Section):
    nproc_per_node: Union[int, Auto] = Field("auto", union_mode="left_to_right")
    """Training processes on each machine, one per GPU. `auto`: one per visible CUDA device, one
    on a machine without a GPU (training in the `factory run` process, as before). With more
    than one process in all (nproc_per_node x nnodes), `factory run` launches the finetune phase
    under torchrun; the other phases stay one process. The effective batch
    (per_device_train_batch_size x gradient_accumulation_steps) stays the configured one: the
    accumulation is divided by the number of processes, which must divide it."""

    strategy: Strategy = "ddp"
    """How the processes share the work, through transformers' Trainer and accelerate: `ddp`
    (each process holds the whole model; the only one the unsloth backend allows, since its
    4-bit weights cannot be sharded), `fsdp` (PyTorch FSDP2 shards weights, gradients and
    optimizer state), `deepspeed_zero2` / `deepspeed_zero3` (DeepSpeed ZeRO stage 2 or 3;
    needs `pip install deepspeed`). The sharding ones need CUDA GPUs (accelerate shards only
    there); on a machine without, they are refused."""

    nnodes: int = Field(1, ge=1)
    """Machines taking part. Unset here, it comes from $NNODES or Slurm's $SLURM_NNODES.
    Start `factory run` on every machine, with the workspace on a filesystem they share."""

    # Where the processes meet is not part of what they compute: excluded from the dumps that
    # fingerprint a phase, so a new port or node order does not re-run the training.
    node_rank: int = Field(0, ge=0, exclude=True)
    """This machine's number, 0 .. nnodes-1. Unset here, it comes from $NODE_RANK or Slurm's
    $SLURM_NODEID. Machine 0 runs the pipeline and writes status, metrics and artifacts; the
    others only join its finetune phase (their processes log to logs/)."""

    master_addr: str = Field("127.0.0.1", exclude=True)
    """Address of machine 0, where the processes meet. Unset here, it comes from $MASTER_ADDR
    or the first host of Slurm's $SLURM_JOB_NODELIST."""

    master_port: int = Field(29500, ge=1, le=65535, exclude=True)
    """A free TCP port on machine 0 for the meeting. Unset here, it comes from $MASTER_PORT."""

    @field_validator("nproc_per_node")
    @classmethod
    def _at_least_one(cls, value: Union[int, str]) -> Union[int, str]:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or auto)")
        return value

    @model_validator(mode="after")
    def _rank_below_nodes(self) -> "DistributedConfig":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes} (machines count from 0)")
        return self


class TrainingConfig(Section):
    per_device_train_batch_size: Union[int, Auto] = 2
    gradient_accumulation_steps: Union[int, Auto] = 4
    warmup_steps: int = 5
    max_steps: int | None = None
    """null trains for num_train_epochs; a number stops after that many optimizer steps."""

    num_train_epochs: float = 3
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"
    optim: str = "adamw_8bit"
    """adamw_8bit needs bitsandbytes (CUDA); elsewhere adamw_torch is used and the log says so."""

    weight_decay: float = 0.01
    logging_steps: int = 1
    seed: int = 3407
    output_dir: str = "outputs"
    """Where the trainer keeps its progress checkpoints (25/50/75/100% of the steps), relative
    to models/checkpoints/; a killed run resumes from the last complete one."""

    packing: bool = False
    """Pack several short examples into each sequence (no padding tokens). Faster on CUDA with
    FlashAttention; on CPU, TRL's packing trained at 0.73x the tokens/s of unpacked batches
    (BENCHMARKS.md), because attention then spans the whole packed row."""

    eval_steps: Union[int, Auto] = "auto"
    """Evaluate the loss on the validation split (data/splits/val.jsonl; answer tokens only,
    masked as in training) every this many optimizer steps, at every progress checkpoint, and
    once before the first step. `auto`: a tenth of the steps, so at least 10 evaluations.
    Without validation records nothing is evaluated and the training loss is judged instead."""

    select: Literal["best", "last"] = "best"
    """The adapter written to save.lora_path: `best`, the one with the lowest validation loss,
    or `last`, the one at the end of training. Both are kept in models/checkpoints/best and
    models/checkpoints/last; metrics/training-stats.json says which was chosen and why. Without
    validation records the last one is taken."""

    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop training once this many evaluations in a row have not lowered the validation loss
    (null: train every step). A killed run resumes with the same best loss and count."""

    report_to: Union[Tracker, list[Tracker]] = "none"
    """Experiment trackers that receive the training and validation losses, a name or a list:
    none, tensorboard (event files in logs/tensorboard/RUN), trackio (local, in trackio's store:
    $TRACKIO_DIR or ~/.cache/huggingface/trackio), wandb, mlflow (these two need their package
    and an account or server). The run is named WORKSPACE-RUNID after the workspace folder and
    the factory run that started the training; the factory's own results (baseline vs
    fine-tuned scores, gate results) are logged to the same run at the end of `factory run`."""

    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Several training processes, on one machine or several: nproc_per_node, strategy, nnodes,
    node_rank, master_addr, master_port."""

    @field_validator("eval_steps")
    @classmethod
    def _positive_interval(cls, value: Union[int, str]) -> Union[int, str]:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or auto)")
        return value

    @field_validator("report_to")
    @classmethod
    def _none_alone(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, list) and "none" in value and len(set(value)) > 1:
            raise ValueError("`none` cannot be combined with a tracker")
        return value

    @property
    def trackers(self) -> list[str]:
        """report_to as a list of tracker names, empty for none."""
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        return [n for n in dict.fromkeys(names) if n != "none"]


class DatasetConfig(Section):
    path: str = "data/splits/train.jsonl"
    text_field: str = "text"
    chat_template: str = "auto"
    """`auto`: the model tokenizer's own chat template (the one it was trained with). Or a
    template the factory ships, applied to a tokenizer that has none or when you want another:
    gemma-3, llama-3.1, qwen-2.5, qwen-3, deepseek-r1, chatml, mistral, phi-3, alpaca. Everything
    else (end of turn and stop tokens, pad token, BOS, training masks, the Ollama template) is
    read off the template. A template that renders earlier turns differently once later ones
    follow (Qwen 3's drops earlier answers' reasoning) trains through TRL's training variant of
    it, or else each answer in a sequence of its own; one whose generation prompt opens a
    reasoning block (DeepSeek R1's, Gemma 4's) trains answers from the assistant header. Only a
    template that renders not even one answer verbatim after its prompt stops the run before
    training (exit 2)."""

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        from factory.chat import read_named_template
        from factory.errors import InputError

        if value != "auto":
            try:
                read_named_template(value)
            except InputError as e:  # names the known templates
                raise ValueError(str(e)) from None
        return value


class SaveConfig(Section):
    lora_path: str = "models/checkpoints/lora"
    merged_path: str = "models/checkpoints/merged"
    gguf_path: str = "models/quantized"
    gguf_quantization: Union[str, list[str]] = "Q8_0"
    """One llama.cpp type or a list, each written as <gguf_path>/model-<TYPE>.gguf: F32, F16,
    BF16 and Q8_0 come from llama.cpp's converter; Q6_K, Q5_K_M, Q5_K_S, Q5_1, Q5_0, Q4_K_M,
    Q4_K_S, Q4_1, Q4_0, IQ4_NL, IQ4_XS, Q3_K_L, Q3_K_M, Q3_K_S and Q2_K from its quantizer."""

    merged_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    """16-bit type of the merged model (never fp32: it doubles the memory, seed 002). Unsloth's
    merge keeps the base checkpoint's own type; files it writes in another are rewritten in this."""

    llama_cpp_dir: str | None = None
    """A llama.cpp checkout to convert with (needs convert_hf_to_gguf.py and gguf-py/); the
    FACTORY_LLAMA_CPP environment variable sets it too. Default: the converter that
    `factory setup-gguf` took from the pinned llama-cpp-python sdist."""

    @field_validator("gguf_quantization")
    @classmethod
    def _known_types(cls, value: Union[str, list[str]]) -> list[str]:
        from factory.llama_cpp import TYPES

        names = [value] if isinstance(value, str) else value
        unknown = [n for n in names if n.upper() not in TYPES]
        if unknown or not names:
            raise ValueError(f"unknown GGUF type(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                             f"choose from {', '.join(TYPES)}")
        return list(dict.fromkeys(n.upper() for n in names))


def _source_from_string(value: str) -> dict[str, str]:
    if value.startswith(("http://", "https://")):
        return {"base_url": value}
    if value.endswith(".gguf"):
        return {"gguf": value}
    if ":" in value and "/" not in value:
        return {"function": value}
    return {"hf": value}


class ModelSource(Section):
    """Something that writes text: exactly one of gguf, base_url, hf/adapter, function.

    Written out as a mapping, or as one string: a path ending in .gguf, an http(s) URL, a
    `module:function`, or else a Hugging Face model folder or hub id."""

    gguf: str | None = None
    """A GGUF file, served on 127.0.0.1 by llama-cpp-python's server for the run and stopped
    after it; a Hugging Face model folder here is first converted to F16 GGUF (models/gguf/)."""

    base_url: str | None = None
    """An OpenAI-compatible endpoint you run (llama-server, vLLM, a hosted API), e.g.
    http://127.0.0.1:8080/v1."""

    model: str | None = None
    """With base_url: the model name to ask for (default: the first one /models lists)."""

    api_key_env: str | None = None
    """With base_url: the environment variable holding the API key. The key is read from the
    environment when the run starts and never written to a log, status or metrics file."""

    hf: str | None = None
    """A Hugging Face model folder or hub id, generated in this process with transformers."""

    adapter: str | None = None
    """A LoRA adapter folder on top of `hf` (default: model.name), e.g. models/checkpoints/lora."""

    function: str | None = None
    """A Python function, module:function. As a model or user simulator it returns the next
    message; as a judge it grades (deterministic rubric code)."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return _source_from_string(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_kind(self) -> "ModelSource":
        kinds = [k for k in ("gguf", "base_url", "function") if getattr(self, k)]
        if self.hf or self.adapter:
            kinds.append("hf/adapter")
        if len(kinds) != 1:
            raise ValueError("give exactly one of gguf, base_url, hf (with an optional adapter), adapter, function"
                             + (f"; got {', '.join(kinds)}" if kinds else ""))
        if (self.model or self.api_key_env) and not self.base_url:
            raise ValueError("model and api_key_env go with base_url")
        if self.function and ":" not in self.function:
            raise ValueError(f"function must be module:function, got {self.function!r}")
        return self


class NamedModel(ModelSource):
    name: str
    """How reports and files call this model, e.g. baseline, gemma-ft."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        # NAME=SOURCE, as on the command line
        if isinstance(value, str):
            name, equals, source = value.partition("=")
            if not equals or not name:
                raise ValueError("write a model as NAME=SOURCE, e.g. base=models/base.gguf")
            return {"name": name, **_source_from_string(source)}
        return value


class JudgeConfig(Section):
    rubric: str = "helpfulness"
    """A rubric shipped with factory (helpfulness, correctness, safety) or a YAML file of your
    own with the same fields (see factory/rubrics/)."""

    model: ModelSource
    """Who judges: an LLM (gguf, base_url, hf) prompted with the rubric, or `module:function`
    (deterministic rubric code)."""

    mode: Literal["single", "pairwise"] = "single"
    """`single`: each answer or conversation gets a score on the rubric's scale (0..1 after
    scaling). `pairwise`: two models' answers to the same item are compared (A, B or tie), in
    both orders; a verdict that flips with the order counts as a tie (MT-Bench)."""

    retries: int = Field(2, ge=0)
    """Extra attempts for a verdict that cannot be parsed (sampled at retry_temperature with a
    new seed); after them the verdict is a counted, reported failure."""

    temperature: float = Field(0.0, ge=0)
    retry_temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(512, ge=1)
    """Room for the judge's explanation before its verdict."""

    pass_threshold: float | None = Field(None, ge=0, le=1)
    """A score (0..1) at or above which an answer passes (the pass rate); null: the rubric's
    pass_score."""


class ConversationsConfig(Section):
    personas: int = Field(15, ge=1)
    """How many personas to generate (seed 002: 15 x 3 conversations per model)."""

    per_persona: int = Field(3, ge=1)
    """Conversations per persona, with each model."""

    persona_seed: int = Field(9000, ge=0)
    """Persona i is generated from seed persona_seed + i: a range disjoint from the training
    data's (seed 002 keeps 0-4999 for training personas)."""

    personas_file: str | None = None
    """A JSON file of your own personas instead: a list of {id, name, description, goal,
    group} (see the README)."""

    requests_per_conversation: int = Field(3, ge=1)
    """Generated personas: held-out test prompts each conversation's goal is made of."""

    max_turns: int = Field(6, ge=1)
    """User messages per conversation at most."""

    stop_token: str = "<END_CONVERSATION>"
    """The simulated user writes this when its goal is met; the conversation ends there."""

    simulator: ModelSource = Field(default_factory=lambda: ModelSource(function="factory.conversations:scripted_user"))
    """The user simulator, the same for every model: an LLM (gguf, base_url, hf) given a
    fixed system prompt (stay in the persona, one message at a time, no invented facts, the
    stop token when done), or module:function. The default sends the persona's requests one
    per turn, then the stop token."""

    system_prompt: str | None = None
    """The system turn the models under comparison get; null: the system turn of the test
    records the goals came from, if any."""


# What the judge, the safety judge and the user simulator are called next to compared models
# (their servers' names and logs): names a compared model may not take.
HELPER_NAMES = JUDGE, SAFETY_JUDGE, USER_SIMULATOR = "judge", "safety-judge", "user-simulator"


class CompareConfig(Section):
    models: list[NamedModel] = Field(default_factory=list)
    """The models to compare, each {name, and one of gguf, base_url, hf/adapter, function}.
    Empty: the base model (model.name converted to GGUF) against the quantize phase's first
    GGUF."""

    baseline: str | None = None
    """The model the others must beat (default: the first)."""

    task: Literal["conversations", "test_split"] = "conversations"
    """`conversations`: full conversations with a simulated user, each judged whole.
    `test_split`: one answer per test example, judged with its reference."""

    concurrency: int = Field(4, ge=1)
    """Requests in flight at once (per evaluation)."""

    request_timeout: float = Field(120, gt=0)
    """Seconds to wait for one answer before retrying."""

    max_retries: int = Field(2, ge=0)
    """Retries of a request that timed out or could not connect."""

    startup_timeout: float = Field(300, gt=0)
    """Seconds a local GGUF server may take to answer /v1/models."""

    n_ctx: int = Field(4096, ge=256)
    """Context length of the local GGUF servers."""

    threads: int | None = Field(None, ge=1)
    """CPU threads of each local GGUF server; null: the machine's cores shared among them."""

    max_tokens: int = Field(256, ge=1)
    """Longest answer of a model under comparison, per turn."""

    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the models and the user simulator (the same for all)."""

    seed: int = 0
    """Every conversation's seed derives from it, the persona and the conversation index: the
    same for every model."""

    max_examples: int | None = Field(None, ge=1)
    """task test_split: the first N test examples only."""

    min_improvement: float = 0.10
    """Success criterion: score improvement over the baseline (seed 002: >= 0.10)."""

    alpha: float = Field(0.05, gt=0, lt=1)
    """Success criterion: Holm-corrected paired-test p-value below this."""

    safety: JudgeConfig | None = None
    """A second judge (e.g. rubric safety) run on every answer; success requires no safety
    regression against the baseline. null: safety is reported as not measured."""

    @model_validator(mode="after")
    def _names(self) -> "CompareConfig":
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        reserved = sorted(set(names) & set(HELPER_NAMES))
        if reserved:
            raise ValueError(f"{', '.join(reserved)}: reserved for the judge and the user simulator; rename the model")
        if self.models and len(self.models) < 2:
            raise ValueError("compare needs at least two models")
        if self.baseline is not None and self.models and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the models ({', '.join(names)})")
        return self


class EvaluationConfig(Section):
    metrics: list[Literal["exact_match", "normalized_exact_match", "token_f1", "rouge_l", "bleu", "chrf",
                          "regex_match", "json_valid", "custom", "judge"]] = Field(
        default_factory=lambda: ["exact_match", "normalized_exact_match", "token_f1", "rouge_l", "chrf"])
    """Scorers run on every test example (each gives 0..1 per example). `judge` grades each
    answer with evaluation.judge (single mode); a verdict that fails is left out of the
    paired statistics and counted."""

    primary: str = "exact_match"
    """The metric the model-performance gate compares (must be one of `metrics`)."""

    regex: str | None = None
    """For regex_match: the answer is the first group of this pattern in both texts,
    e.g. "####\\s*(-?[\\d,.]+)" for GSM8K."""

    custom_scorer: str | None = None
    """For custom: 'module:function' taking (prediction, reference) and returning 0..1."""

    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)
    """Prompts generated at once (left-padded, greedy)."""

    max_examples: int | None = Field(None, ge=1)
    """Score only the first N test examples (null: all), in baseline, evaluate and quantize's
    checks; the gates then check those N."""

    loss: bool = True
    """Also compute the test loss and perplexity on the assistant tokens."""

    second_test_set: str | None = None
    """Optional extra test file in canonical form (e.g. a safety set): the fine-tuned model
    must not score lower than the base model on it by more than the gate's tolerance."""

    bootstrap_samples: int = 10_000
    seed: int = 0

    judge: JudgeConfig | None = None
    """An LLM or a rubric function that grades answers: the `judge` metric, and `factory compare`."""

    compare: CompareConfig = Field(default_factory=CompareConfig)
    """`factory compare`: the same evaluation on two or more models, judged, with paired
    statistics (metrics/comparison.json)."""

    conversations: ConversationsConfig = Field(default_factory=ConversationsConfig)
    """compare task `conversations`: personas, the user simulator and the turn limit."""

    @model_validator(mode="after")
    def _primary_is_scored(self) -> "EvaluationConfig":
        if self.primary not in self.metrics:
            raise ValueError(f"primary {self.primary!r} must be one of metrics {self.metrics}")
        if "regex_match" in self.metrics and not self.regex:
            raise ValueError("metrics has regex_match: set `regex` too")
        if "custom" in self.metrics and not self.custom_scorer:
            raise ValueError("metrics has custom: set `custom_scorer` (module:function) too")
        if "judge" in self.metrics and (self.judge is None or self.judge.mode != "single"):
            raise ValueError("metrics has judge: set `judge` (with mode single) too")
        return self


# --- the whole file --------------------------------------------------------------------


class FactoryConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gates: dict[str, dict[str, Union[float, int, bool, str]]] = Field(default_factory=dict)
    """Threshold overrides per gate: {gate-name: {metric.path: new threshold}}, e.g.
    {data-valid: {format.records_out: 500}}. Edit gates/NAME.yaml for anything more."""

    @model_validator(mode="after")
    def _unsloth_does_not_shard(self) -> "FactoryConfig":
        strategy = self.training.distributed.strategy
        if self.model.backend == "unsloth" and strategy in SHARDING_STRATEGIES:
            raise ValueError(f"training.distributed.strategy {strategy} shards the model's weights across processes, "
                             "but the unsloth backend's 4-bit weights cannot be sharded: use strategy ddp with "
                             "unsloth, or model.backend hf")
        return self

    def section(self, name: str) -> Any:
        """A section ("save") or one key ("save.lora_path") as plain JSON data: what a phase's
        fingerprint hashes."""
        value: Any = self
        for part in name.split("."):
            value = getattr(value, part)
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


# Environment variables that set a config key the file leaves unset: key path -> the variables,
# the first one set wins (torchrun's and Slurm's names for the multi-node contract).
ENVIRONMENT: dict[tuple[str, ...], tuple[str, ...]] = {
    ("save", "llama_cpp_dir"): ("FACTORY_LLAMA_CPP",),
    ("training", "distributed", "nnodes"): ("NNODES", "SLURM_NNODES"),
    ("training", "distributed", "node_rank"): ("NODE_RANK", "SLURM_NODEID"),
    ("training", "distributed", "master_addr"): ("MASTER_ADDR", "SLURM_JOB_NODELIST"),
    ("training", "distributed", "master_port"): ("MASTER_PORT",),
}


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> FactoryConfig:
    """Read and validate factory.yaml (YAML or JSON). A missing file means all defaults.

    `environ` (the CLI passes os.environ) fills the keys of ENVIRONMENT that the file leaves
    unset; the file wins.
    """
    path = Path(path)
    raw: Any = {}
    if path.exists():
        try:
            raw = load_yaml(path.read_text(encoding="utf-8-sig"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, ...), not {type(raw).__name__}")
    environ = environ or {}
    for keys, variables in ENVIRONMENT.items():
        variable = next((v for v in variables if environ.get(v)), None)
        if variable:
            value = environ[variable]
            _fill_unset(raw, keys, _first_slurm_host(value) if variable == "SLURM_JOB_NODELIST" else value)
    return parse_config(raw, source=str(path))


def _fill_unset(raw: dict, keys: tuple[str, ...], value: str) -> None:
    """Set raw[k1][k2]... to `value` unless the file sets it (a section that is not a mapping is
    left for validation to report)."""
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            return
    node.setdefault(keys[-1], value)


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[01-04],cpu7" -> "gpu01"), expanded by Slurm's
    own `scontrol show hostnames` when the list is compressed."""
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    import subprocess

    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"SLURM_JOB_NODELIST {nodelist!r} is compressed and `scontrol show hostnames` failed ({e}); "
                          "set MASTER_ADDR to the first node's address") from None
    return hosts[0]


# Names users bring from Axolotl, LLaMA-Factory and plain PEFT/transformers scripts.
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "micro_batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "sequence_len": "max_seq_length",
    "cutoff_len": "max_seq_length",
    "max_length": "max_seq_length",
    "base_model": "name",
    "model_name": "name",
    "model_name_or_path": "name",
    "quantization": "gguf_quantization",
}


def parse_config(raw: dict, source: str = "config") -> FactoryConfig:
    try:
        return FactoryConfig.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err) for err in e.errors()]
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n{listing}") from None


def _describe(err: dict) -> str:
    *path, last = err["loc"] or ("",)
    loc = [str(part) for part in path if not _is_union_tag(part)]
    # an unknown key is the user's, whatever it looks like ("Inputs", "[/INST]"); else the last
    # part may be a validator's tag too
    loc += [str(last)] if err["type"] == "extra_forbidden" or not _is_union_tag(last) else []
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        key = loc[-1].lower()  # config keys are lower-case: "R" means r
        close = [ALIASES[key]] if ALIASES.get(key) in known else difflib.get_close_matches(key, known + list(ALIASES), n=1, cutoff=0.5)
        close = [ALIASES.get(c, c) for c in close if ALIASES.get(c, c) in known]
        parent = ".".join(loc[:-1])
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else f"valid keys: {', '.join(known)}"
        return f"{where}: unknown key; {hint}"
    message = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        message += f" (got {err['input']!r})"
    return f"{where}: {message}"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts validator and union-member names in the location
    # ("inputs.0.function-after[...].path"); config keys are lower-case and bracket-free.
    return isinstance(part, str) and ("[" in part or part[:1].isupper())


def _known_keys(loc: list[str]) -> list[str]:
    model: Any = FactoryConfig
    for part in loc:
        if part.isdigit():
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like list[Union[str, InputSpec]]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def commented_template(model: type[BaseModel] = FactoryConfig, indent: int = 0,
                       defaults: BaseModel | None = None) -> str:
    """factory.yaml with every key at its default and its docstring as a comment."""
    pad = " " * indent
    lines: list[str] = []
    defaults = model() if defaults is None else defaults
    for name, field in model.model_fields.items():
        if field.description:
            lines += [f"{pad}# {line.strip()}" for line in field.description.splitlines()]
        value = getattr(defaults, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.append(commented_template(type(value), indent + 2, value))
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            item = commented_template(type(value[0]), indent + 4, value[0]).splitlines()
            first = next(i for i, line in enumerate(item) if not line.lstrip().startswith("#"))
            item[first] = f"{pad}  - {item[first].lstrip()}"
            lines.append(f"{pad}{name}:")
            lines += item
        else:
            dumped = yaml.safe_dump({name: value}, default_flow_style=True, sort_keys=False, width=1000).strip()
            lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
        if indent == 0:
            lines.append("")
    return "\n".join(lines)
