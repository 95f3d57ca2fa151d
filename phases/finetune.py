"""finetune: LoRA fine-tuning on the train split, with Unsloth (CUDA) or TRL + PEFT (anywhere).

Reads top to bottom like a recipe:

1. pick the backend (unsloth when CUDA and unsloth are there, else hf) and say why;
2. resolve `auto` values (seed 004's VRAM table), load the base model, add LoRA adapters;
3. turn the train and val splits into datasets with one function, so that loss falls on
   assistant tokens only in both, with the model's chat format (factory.chat, read from its
   own template): on hf as token ids and labels (every assistant turn and its end-of-turn
   token trained, the rest -100); on unsloth through seed 004's text formatting and
   `train_on_responses_only` with the markers the chat format found;
4. train with TRL's SFTTrainer (in each of several processes when training.distributed asks,
   launched by the runner through factory.distributed: rank 0 alone writes the adapters,
   checkpoint states and reports; the gradient accumulation is shared out), saving progress checkpoints at 25/50/75/100% of the steps
   (seed 003), each with a training_state.json; a killed run resumes from the last complete
   one; live state goes to .factory/training-status.json through the runner. The validation
   loss is measured before the first step, every `training.eval_steps` and at every
   checkpoint; each new lowest one saves the adapter to models/checkpoints/best, and
   `training.early_stopping_patience` ends the run when it stops falling. The best loss and
   the patience count live in the Trainer's state, which every checkpoint holds;
5. keep models/checkpoints/last, copy the `training.select`ed adapter to save.lora_path and
   return the training statistics (metrics/training-stats.json) that the training-completed
   gate checks: the loss curves, their fitted trends, the selection and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import resource
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import xxhash

from factory import checkpoints, modeling, trackers
from factory.config import SHARDING_STRATEGIES, FactoryConfig
from factory.chat import named_templates
from factory.errors import InputError
from factory.fingerprint import HashCache, base_model_identity
from factory.io import write_json
from factory.phase import TRAINING_LIBRARIES, Phase, PhaseContext
from factory.workspace import Workspace, output_folder, staged_dir

CHECKPOINT_FRACTION = 0.25  # seed 003: checkpoints at 25, 50, 75 and 100% of training
EVAL_FRACTION = 0.1  # training.eval_steps: auto evaluates every tenth of the steps (at least 10 times)
STATE_FILE = checkpoints.STATE_FILE  # written last: a checkpoint without it is incomplete
# The best adapter's weights as of a checkpoint, restored on resume. A file, not an adapter
# folder: the Trainer takes any sub-folder holding adapter_model.safetensors for an adapter of
# the model it resumes, and would then not load the trained one.
BEST_IN_CHECKPOINT = "best_adapter.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONVERGENCE_WINDOW_FRACTION = 0.25  # of the evaluations up to the selected adapter: its trend window
TREND_MIN_POINTS = 3  # a trend is a line fitted through at least this many points
LIBRARY_LOGGERS = ("trl", "peft", "accelerate", "datasets", "torch", "py.warnings")  # besides transformers


def run(ctx: PhaseContext) -> dict[str, Any]:
    from factory import plan

    cfg, ws, log = ctx.config, ctx.workspace, ctx.log
    main = ctx.rank == 0  # the only process that writes (one process: this one)
    train_file, val_file = ws.split_file("train"), ws.split_file("val")
    if not train_file.exists():
        raise InputError(f"{ws.rel(train_file)} not found; run `factory run split` first")
    records = _read_records(train_file)
    if not records:
        raise InputError(f"{ws.rel(train_file)} is empty; check the split phase's metrics/split.json")
    val_records = _read_records(val_file) if val_file.exists() else []
    if not val_records:
        log.info("no validation records in %s: the training loss is judged, and the last adapter kept", ws.rel(val_file))
    lora_dir, best_dir, last_dir = ws.path(cfg.save.lora_path), ws.adapter_dir("best"), ws.adapter_dir("last")
    if lora_dir.resolve() in (best_dir.resolve(), last_dir.resolve()):
        raise InputError(f"save.lora_path {cfg.save.lora_path!r} is where finetune keeps its best or last adapter; "
                         "choose another folder, e.g. models/checkpoints/lora")
    trackers.check_installed(cfg.training.trackers)

    # 1. backend
    backend = modeling.select_backend(cfg.model.backend, sharded=ctx.world_size > 1 and
                                      cfg.training.distributed.strategy in SHARDING_STRATEGIES)
    log.info("backend %s on %s: %s", backend.name, backend.device, backend.reason)
    ctx.training.update(backend=backend.name, backend_reason=backend.reason)

    # 2. model and adapters, seeded first: LoRA's initial weights are random draws (both backends)
    resolved = plan.resolve(cfg, plan.accelerator_memory_gib(), world_size=ctx.world_size)
    from transformers import set_seed  # after select_backend: unsloth must be imported first

    set_seed(cfg.training.seed)  # python, numpy and torch on every device
    model, chat = modeling.load_model(cfg, ws, backend, max_seq_length=resolved.max_seq_length)
    model = modeling.add_lora(model, cfg, backend, rank=resolved.rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d: %d trainable parameters; batch %d x %d accumulation x %d processes = %d, max length %d",
             resolved.rank, trainable, resolved.batch_size, resolved.gradient_accumulation_steps, resolved.world_size,
             resolved.effective_batch_size, resolved.max_seq_length)

    # 3. checkpoints from an earlier, interrupted run of the same config and data
    output_dir = output_folder(ws, ws.path(cfg.training.output_dir), "training.output_dir")
    fingerprint = _fingerprint(cfg, ws, train_file, val_file, resolved, model)
    if ctx.options.get("restart") and main:
        checkpoints.remove_all(ws, output_dir, log)
    # Every process reads the same (shared) folder and takes the same checkpoint; with --restart, none.
    resume_from = None if ctx.options.get("restart") else checkpoints.last_complete(output_dir, fingerprint, log)
    resumed_state = json.loads((resume_from / STATE_FILE).read_text()) if resume_from else {}
    if main:
        _restore_best_adapter(resume_from, best_dir, last_dir, fingerprint)
    run_name = resumed_state.get("tracker_run") or trackers.run_name(ws, ctx.run_id)

    # 4. trainer; what it prints (its log dicts, a tracker's banner) goes to logs/training.log,
    # the terminal shows the factory's progress only
    if resume_from:
        log.info("resuming from %s", ws.rel(resume_from))
    log_file = ws.logs_dir / ("training.log" if main else f"training.rank-{ctx.rank}.log")
    with contextlib.closing(TrainingLog(log_file)) as training_log, \
            contextlib.redirect_stdout(training_log), training_log.capturing_library_logs(), \
            trackers.environment(cfg.training.trackers, ws, run_name):
        trainer = _build_trainer(cfg, ws, backend, model, chat, records, val_records, resolved, output_dir, log,
                                 run_name=run_name, evaluate_first=resume_from is None)
        if main:
            trainer.add_callback(checkpoints.recorder(ws, output_dir))
            trainer.add_callback(_make_best_adapter_callback()(best_dir, fingerprint))
        tracker = _make_status_callback()(ctx, fingerprint, ws, run_name, training_log)
        trainer.add_callback(tracker)
        started = time.monotonic()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        train_seconds = time.monotonic() - started
    if not main:
        return {}  # rank 0 saves the adapters and reports

    # 5. adapters (last, best, the selected one in save.lora_path), tokenizer, statistics
    state = trainer.state
    train_curve = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"), "epoch": e.get("epoch")}
                   for e in state.log_history if "loss" in e]
    eval_curve = [{"step": e["step"], "eval_loss": e["eval_loss"], "epoch": e.get("epoch")}
                  for e in state.log_history if "eval_loss" in e]
    last = _point(state.global_step, eval_curve, train_curve)
    _save_adapter(model, last_dir, {**last, "fingerprint": fingerprint})
    best = _point(state.best_global_step, eval_curve, train_curve) if state.best_global_step else None
    if best and _adapter_step(best_dir) != best["step"]:
        raise RuntimeError(f"{ws.rel(best_dir)} holds step {_adapter_step(best_dir)}, but the trainer's best "
                           f"evaluation is at step {best['step']}")
    selection = select_adapter(cfg.training.select, best, last)
    for folder in [best_dir, last_dir] if best else [last_dir]:
        chat.tokenizer.save_pretrained(str(folder))
    with staged_dir(ws, lora_dir, "save.lora_path") as staging:  # replaces only what the factory wrote there
        shutil.copytree(best_dir if selection["adapter"] == "best" else last_dir, staging, dirs_exist_ok=True)
    log.info("%s", selection["reason"])
    stopper = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "EarlyStoppingCallback"), None)
    stopped_early = bool(stopper and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience)
    tokens = int(state.num_input_tokens_seen or 0) - tracker.resumed_tokens  # this run's share
    return {
        "completed": state.global_step >= state.max_steps or stopped_early,
        "stop_reason": "early_stopping" if stopped_early else "max_steps" if state.global_step >= state.max_steps else None,
        "backend": backend.name,
        "backend_reason": backend.reason,
        "device": backend.device,
        "model": cfg.model.name,
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "epochs": state.epoch,
        "resumed_from_step": tracker.resumed_step,
        "final_loss": train_curve[-1]["loss"] if train_curve else None,
        "loss_history": train_curve,
        "eval_history": eval_curve,
        "nonfinite_losses": sum(1 for h in train_curve if not math.isfinite(h["loss"])),
        "convergence": convergence(train_curve, eval_curve, selection),
        "validation": validation(eval_curve, train_curve, selection, stopped_early) if best else None,
        "selection": selection,
        "trackers": trackers.run_info(cfg.training.trackers, ws, run_name) if cfg.training.trackers else None,
        "tokens": tokens,
        "tokens_note": "trained in this run (since resumed_from_step); tokens_per_second is over the same span",
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds and tokens else None,
        "peak_memory_mb": _peak_memory_mb(backend.device),
        "trainable_parameters": trainable,
        "resolved": dataclasses.asdict(resolved),
        "distributed": {"world_size": resolved.world_size, "strategy": cfg.training.distributed.strategy,
                        "nnodes": cfg.training.distributed.nnodes,
                        "per_device_train_batch_size": resolved.batch_size,
                        "gradient_accumulation_steps_per_process": resolved.gradient_accumulation_steps,
                        "effective_batch_size": resolved.effective_batch_size,
                        # what accelerate ran (NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED), and whether the
                        # trained weights were sharded across the processes
                        "accelerate": trainer.accelerator.distributed_type.value,
                        "sharded_parameters": sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters())},
        "adapter": ws.rel(lora_dir),
        "adapters": {"best": ws.rel(best_dir) if best else None, "last": ws.rel(last_dir)},
        "train_records": len(records),
        "chat_format": {"template": chat.template_source, "end_of_turn": chat.eot_token,
                        "end_of_turn_appended": chat.eot_appended, "stop_token_ids": chat.stop_token_ids,
                        "pad_token": chat.tokenizer.pad_token, "instruction_part": chat.instruction_part,
                        "response_part": chat.response_part},
        "train_xxh3_128": HashCache(ws).file_digest(train_file),  # known to the run: not read again
        "val_records": len(val_records),
        "val_xxh3_128": HashCache(ws).file_digest(val_file) if val_records else None,
    }


PHASE = Phase(
    name="finetune",
    summary="Fine-tune LoRA adapters on the train split, validated on the val split",
    metrics="training-stats",
    run=run,
    config_sections=("model", "lora", "training", "dataset", "save.lora_path"),
    inputs=lambda cfg, ws: [ws.split_file("train"), ws.split_file("val"), *modeling.local_model_inputs(cfg, ws)],
    outputs=lambda cfg, ws: [ws.path(cfg.save.lora_path), ws.adapter_dir("last")],
    libraries=TRAINING_LIBRARIES,
    distributed=True,
)


class TrainingLog:
    """logs/training.log, one JSON object a line: the trainer's log dicts and events, and what
    the libraries print or warn while training, which stays off the terminal."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        self._partial = ""

    def entry(self, **fields: Any) -> None:
        time_now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._file.write(json.dumps({"time": time_now, **fields}, default=str) + "\n")
        self._file.flush()

    def write(self, text: str) -> int:  # a file for redirect_stdout: each printed line is an entry
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if line.strip():
                self.entry(output=line)
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._partial.strip():
            self.entry(output=self._partial)
        self._file.close()

    @contextlib.contextmanager
    def capturing_library_logs(self):
        """The training libraries' log records and Python warnings go to this log, not stderr."""
        import logging

        from transformers.utils import logging as hf_logging

        log = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                log.entry(level=record.levelname, logger=record.name, message=record.getMessage())

        handler = Handler()
        others = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
        saved = [(logger.propagate, logger.handlers[:]) for logger in others]
        hf_logging.disable_default_handler()  # transformers' own handler writes to stderr
        hf_logging.add_handler(handler)
        for logger in others:
            logger.handlers, logger.propagate = [handler], False
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            for logger, (propagate, handlers) in zip(others, saved):
                logger.handlers, logger.propagate = handlers, propagate
            hf_logging.remove_handler(handler)
            hf_logging.enable_default_handler()


def _read_records(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


# --- training set and trainer ---------------------------------------------------------------


def _build_trainer(cfg: FactoryConfig, ws: Workspace, backend, model, chat, records: list[dict], val_records: list[dict],
                   resolved, output_dir: Path, log, *, run_name: str, evaluate_first: bool):
    from transformers import EarlyStoppingCallback, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    t = cfg.training
    cuda = backend.device == "cuda"
    optim = t.optim
    if "8bit" in optim and not (cuda and importlib.util.find_spec("bitsandbytes")):
        optim = "adamw_torch"
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=resolved.batch_size,
        gradient_accumulation_steps=resolved.gradient_accumulation_steps,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps if t.max_steps else -1,
        num_train_epochs=t.num_train_epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        optim=optim,
        weight_decay=t.weight_decay,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps",
        save_steps=CHECKPOINT_FRACTION,
        disable_tqdm=True,
        bf16=cuda and str(modeling.torch_dtype(cfg, "cuda")) == "torch.bfloat16",
        fp16=cuda and str(modeling.torch_dtype(cfg, "cuda")) == "torch.float16",
        use_cpu=backend.device == "cpu",
        gradient_checkpointing=bool(cfg.lora.use_gradient_checkpointing) and backend.name == "hf",
        max_length=resolved.max_seq_length,
        packing=t.packing,
        include_num_input_tokens_seen="non_padding",  # tokens/s counts real tokens, not padding
        dataloader_num_workers=0,
        dataset_num_proc=None,
        **trackers.trainer_arguments(t.trackers, ws, run_name),
        **_strategy_arguments(cfg, resolved.world_size),
    )
    import datasets

    datasets.disable_progress_bars()  # the tokenizing bars are not the factory's progress
    train_set = _dataset(backend, chat, records, resolved.max_seq_length, "training", log)
    if not len(train_set):
        raise InputError(f"no training record has an answer token within model.max_seq_length "
                         f"({resolved.max_seq_length}); raise it")
    eval_set = _dataset(backend, chat, val_records, resolved.max_seq_length, "validation", log) if val_records else None
    if eval_set is not None and len(eval_set):
        args.update(
            eval_strategy="steps",
            eval_steps=t.eval_steps if t.eval_steps != "auto" else EVAL_FRACTION,
            eval_on_start=evaluate_first,  # the curve starts from the untrained adapter; not again on resume
            # Bounded memory: batches no larger than training's, the loss kept per batch, no logits
            # gathered across batches.
            per_device_eval_batch_size=resolved.batch_size,
            prediction_loss_only=True,
            # The Trainer keeps the lowest loss and its step in its state (and every checkpoint):
            # the best adapter, and early stopping's reference.
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            restore_callback_states_from_checkpoint=True,  # early stopping's patience count survives a resume
        )
    else:
        eval_set = None
    if backend.name == "unsloth":
        # Seed 004, steps 4-5: chat-template text (BOS left to the tokenizer), then mask
        # everything but the model's turns with train_on_responses_only (train and eval sets
        # alike), given the markers the chat format read off this model's template.
        from unsloth.chat_templates import train_on_responses_only

        if not chat.markers_match_tokens:
            raise InputError(
                f"Unsloth's train_on_responses_only cannot find this template's markers ({chat.instruction_part!r}, "
                f"{chat.response_part!r}) in the tokenized conversations: this tokenizer splits them differently in "
                "context, so every label would be masked; set model.backend: hf (the factory's own masks) or "
                f"dataset.chat_template to one of {', '.join(named_templates())}")
        trainer = SFTTrainer(model=model, processing_class=chat.tokenizer, train_dataset=train_set,
                             eval_dataset=eval_set, args=SFTConfig(dataset_text_field="text", **args))
        trainer = train_on_responses_only(trainer, instruction_part=chat.instruction_part,
                                          response_part=chat.response_part)
    else:
        trainer_class = SFTTrainer if cuda else _cpu_safe_trainer()
        # Already tokenized and cut: TRL's own preparation is skipped, except for packing,
        # which it does.
        prepared = {} if t.packing else {"dataset_kwargs": {"skip_prepare_dataset": True}}
        trainer = trainer_class(model=model, processing_class=chat.tokenizer, train_dataset=train_set,
                                eval_dataset=eval_set, args=SFTConfig(**args, **prepared))
    # The raw log dicts belong in logs/training.log and the trackers, not between the progress lines.
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_make_checkpoint_evaluation_callback()())
    if eval_set is not None and t.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    return trainer


def _strategy_arguments(cfg: FactoryConfig, world_size: int) -> dict[str, Any]:
    """training.distributed.strategy as the Trainer's arguments, from which it configures accelerate
    (DDP, or its FullyShardedDataParallelPlugin or DeepSpeedPlugin)."""
    strategy = cfg.training.distributed.strategy
    if world_size == 1:
        return {}
    if strategy == "ddp":
        return {"ddp_find_unused_parameters": False}  # every LoRA weight takes part in every step
    if strategy == "fsdp":
        # FSDP2, each decoder layer (the model's _no_split_modules) a unit, full state dicts saved
        return {"fsdp": True, "fsdp_config": {}}
    if importlib.util.find_spec("deepspeed") is None:
        raise InputError(f"training.distributed.strategy {strategy} needs DeepSpeed: pip install deepspeed")
    return {"deepspeed": {"zero_optimization": {"stage": 2 if strategy == "deepspeed_zero2" else 3},
                          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                          "train_batch_size": "auto", "gradient_clipping": "auto",
                          "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}}


def _dataset(backend, chat, records: list[dict], max_length: int, split: str, log):
    """The records as the trainer's dataset: one function for the train and the val split, so
    that both are formatted and masked the same way (the loss on answer tokens only)."""
    left_out = sum(chat.reasoning_left_out(r) for r in records)
    if left_out:
        log.warning("%d %s answers hold reasoning (before %s) that the chat template (%s) leaves out of the training "
                    "text: the model learns those answers without it. To train the reasoning, set dataset.chat_template "
                    "to a template that keeps it (for DeepSeek R1 distills: deepseek-r1, whose training variant does)",
                    left_out, split, chat.reasoning_end or "</think>", chat.template_source)
    if backend.name == "unsloth":
        return _text_dataset(chat, records)
    dataset, dropped = _token_dataset(chat, records, max_length)
    if len(dataset) + dropped != len(records):
        log.info("%d %s records train as %d sequences (%s)", len(records), split, len(dataset) + dropped,
                 chat.template_source)
    if dropped:
        log.warning("%d %s sequences (from %d records) have no answer token within max_seq_length %d and are "
                    "left out", dropped, split, len(records), max_length)
    return dataset


def _token_dataset(chat, records: list[dict], max_length: int) -> tuple[Any, int]:
    """input_ids and labels from the chat format, cut to max_length: what the hf backend
    trains on (a record is one sequence, or one per answer: ChatFormat.training_examples). Also
    returns how many sequences were left with no trained token by the cut."""
    from datasets import Dataset

    rows, dropped = [], 0
    for number, record in enumerate(records, 1):
        try:
            examples = chat.training_examples(record)
        except InputError as e:  # a record whose answers the template does not render verbatim
            raise InputError(f"record {number} of the split: {e}") from None
        for example in examples:
            example = {key: values[:max_length] for key, values in example.items()}
            if any(label != -100 for label in example["labels"]):
                rows.append(example)
            else:
                dropped += 1
    return Dataset.from_list(rows), dropped


def _text_dataset(chat, records: list[dict]):
    """Rendered conversations without a leading BOS (the tokenizer adds it): the unsloth backend."""
    from datasets import Dataset

    return Dataset.from_list([{"text": chat.training_text(r["conversations"])} for r in records])


def _cpu_safe_trainer():
    """TRL 1.15's SFTTrainer.compute_loss calls a Triton kernel that CPU torch lacks
    (`'NoneType' object has no attribute 'apply'`); off CUDA, the loss is computed here, the
    same cross-entropy as the model's own (sum over trained tokens / their number in the batch),
    but with the output embedding applied only at the positions that predict a trained token:
    the head's full-vocabulary logits at every prompt position were most of a step's time and
    memory (a 32k-vocabulary tiny model: 90% of its FLOPs; a prompt is 3/4 of the example's
    tokens). The token accuracy SFTTrainer logs is kept."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    class CPUSafeSFTTrainer(SFTTrainer):
        _head = None  # modeling.LogitHead, built on the first batch; False: the model's own loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            # a wrapped model (DDP) must run its own forward, or its gradients are not shared
            head = self._logit_head(model, inputs) if self.accelerator.unwrap_model(model) is model else False
            if head is False:
                loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch)
                labels, predicted = inputs["labels"][:, 1:], outputs.logits[:, :-1].detach().argmax(-1)
            else:
                targets = inputs["labels"][:, 1:]
                scored = targets != -100  # position t predicts token t + 1
                forward = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
                hidden = modeling.base_transformer(model)(**forward, use_cache=False).last_hidden_state
                labels = targets[scored]
                loss, predicted = head.loss(hidden[:, :-1][scored], labels)
                loss = loss / (num_items_in_batch if num_items_in_batch is not None else scored.sum().clamp(min=1))
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss scales it
                outputs = {"loss": loss}
            with torch.no_grad():
                mask = labels != -100
                correct = (predicted == labels) & mask
                mode = "train" if model.training else "eval"
                self._metrics[mode]["mean_token_accuracy"].append((correct.sum() / mask.sum().clamp(min=1)).item())
            return (loss, outputs) if return_outputs else loss

        def _load_optimizer_and_scheduler(self, checkpoint):
            # With several processes, transformers maps the resumed optimizer state to args.device,
            # which accelerate makes cpu:<local rank> on CPUs; torch.load refuses an indexed CPU
            # ("don't know how to restore data location"). Plain "cpu" is the same place.
            load = torch.load

            def load_on_cpu(*args, map_location=None, **kwargs):
                if isinstance(map_location, torch.device) and map_location.type == "cpu":
                    map_location = "cpu"
                return load(*args, map_location=map_location, **kwargs)

            torch.load = load_on_cpu
            try:
                return super()._load_optimizer_and_scheduler(checkpoint)
            finally:
                torch.load = load

        def _logit_head(self, model, inputs):
            if self._head is None:
                training = model.training
                model.eval()  # the head's probe compares two forward passes: no dropout
                try:
                    self._head = modeling.LogitHead(model, probe=inputs["input_ids"][0].tolist())
                except InputError as e:  # logits post-processed some other way: the model's own loss
                    self._head = False
                    import logging

                    logging.getLogger("factory.finetune").info("the loss uses the model's full logits: %s", e)
                finally:
                    model.train(training)
            return self._head

    return CPUSafeSFTTrainer


# --- live status, evaluation at checkpoints, the best adapter --------------------------------


def _make_status_callback():
    from transformers import TrainerCallback

    class StatusCallback(TrainerCallback):
        """Feeds .factory/training-status.json (through the runner), the phase's progress bar,
        logs/training.log, and writes training_state.json into each checkpoint."""

        def __init__(self, ctx: PhaseContext, fingerprint: str, ws: Workspace, run_name: str, log: TrainingLog):
            self.ctx, self.fingerprint, self.ws, self.run_name, self._log = ctx, fingerprint, ws, run_name, log
            self.resumed_step = 0
            self.resumed_tokens = 0
            self._t0 = time.monotonic()
            self._last = {"loss": None, "learning_rate": None, "eval_loss": None}

        def on_train_begin(self, args, state, control, **kwargs):
            self.resumed_step = state.global_step
            self.resumed_tokens = int(state.num_input_tokens_seen or 0)
            self._t0 = time.monotonic()
            evals = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
            self._last["eval_loss"] = evals[-1] if evals else None
            self.ctx.progress.start(state.max_steps, "steps")
            self.ctx.progress.advance(state.global_step)
            # A resumed run knows its best loss at once; its last one is on the curve already,
            # and eval_loss shows this run's evaluations.
            self.ctx.training.update(step=state.global_step, total_steps=state.max_steps,
                                     epoch=float(state.epoch or 0), total_epochs=float(state.num_train_epochs),
                                     best_eval_loss=state.best_metric)
            self._write_log({"event": "train_begin", "step": state.global_step, "total_steps": state.max_steps,
                             "best_eval_loss": state.best_metric, "best_step": state.best_global_step})

        def on_step_end(self, args, state, control, **kwargs):
            self.ctx.progress.advance(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            self._write_log({"step": state.global_step, "epoch": state.epoch, **logs})
            if "loss" not in logs:
                return
            self._last.update(loss=float(logs["loss"]), learning_rate=float(logs.get("learning_rate", 0.0)))
            done = state.global_step - self.resumed_step
            elapsed = time.monotonic() - self._t0
            eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
            self.ctx.training.update(step=state.global_step, epoch=float(state.epoch or 0), eta_seconds=eta,
                                     loss=self._last["loss"], learning_rate=self._last["learning_rate"])

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = float(metrics["eval_loss"])
            self._last["eval_loss"] = loss
            # the trainer updates state.best_metric after this call, by the same rule as is_new_best
            best = loss if is_new_best(state, loss) else state.best_metric
            self.ctx.training.update(step=state.global_step, epoch=float(state.epoch or 0), eval_loss=loss,
                                     best_eval_loss=best)

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_json(checkpoint / STATE_FILE, {
                "schema_version": 1,
                "step": state.global_step,
                "total_steps": state.max_steps,
                "progress_pct": round(100 * state.global_step / state.max_steps, 1),
                "epoch": state.epoch,
                "saved_at": now,
                "fingerprint": self.fingerprint,
                "tracker_run": self.run_name,
                "best_eval_loss": state.best_metric,
                "best_step": state.best_global_step,
                **self._last,
            })
            self.ctx.training.update(checkpoint_at=now)
            self._write_log({"event": "checkpoint", "step": state.global_step, "path": self.ws.rel(checkpoint)})

        def on_train_end(self, args, state, control, **kwargs):
            self._write_log({"event": "train_end", "step": state.global_step, "best_eval_loss": state.best_metric,
                             "best_step": state.best_global_step})

        def _write_log(self, entry: dict) -> None:
            self._log.entry(**entry)

    return StatusCallback


def _make_checkpoint_evaluation_callback():
    from transformers import TrainerCallback

    class EvaluateAtCheckpoints(TrainerCallback):
        """Evaluate at every progress checkpoint too, so each checkpoint knows the best adapter
        up to it (the trainer evaluates before it saves)."""

        def on_step_end(self, args, state, control, **kwargs):
            if args.eval_strategy != "no" and state.save_steps and state.global_step % state.save_steps == 0:
                control.should_evaluate = True

    return EvaluateAtCheckpoints


def is_new_best(state, eval_loss: float) -> bool:
    """The Trainer's rule for a new best (metric_for_best_model eval_loss, lower is better);
    the evaluation before the first step is the curve's start, not a candidate adapter."""
    return state.global_step > 0 and math.isfinite(eval_loss) and (state.best_metric is None or eval_loss < state.best_metric)


def _make_best_adapter_callback():
    from transformers import TrainerCallback

    class BestAdapter(TrainerCallback):
        """Each new lowest validation loss saves the adapter to models/checkpoints/best; each
        progress checkpoint keeps a copy of it, which a resumed run restores."""

        def __init__(self, best_dir: Path, fingerprint: str):
            self.best_dir, self.fingerprint = best_dir, fingerprint

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            loss = float(metrics["eval_loss"])
            if is_new_best(state, loss):
                _save_adapter(model, self.best_dir, {"step": state.global_step, "eval_loss": loss,
                                                     "fingerprint": self.fingerprint})

        def on_save(self, args, state, control, **kwargs):
            # Runs before StatusCallback.on_save writes training_state.json (with the best
            # step and loss), which marks the checkpoint complete.
            if state.best_global_step:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                shutil.copyfile(self.best_dir / ADAPTER_WEIGHTS, checkpoint / BEST_IN_CHECKPOINT)

    return BestAdapter


def _save_adapter(model, folder: Path, state: dict) -> None:
    """The LoRA adapter (not the base model) plus a training_state.json saying which step it is,
    written beside `folder` and swapped in, so that a kill leaves the old one or the new one."""
    partial = folder.with_name(f".{folder.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        model.save_pretrained(str(partial))
        write_json(partial / STATE_FILE, {"schema_version": 1, **state})
    except BaseException:  # a full disk, an interruption: no half-written adapter left behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _replace_dir(partial, folder)


def _adapter_step(folder: Path, fingerprint: str | None = None) -> int | None:
    """The step of the adapter in `folder` (of the training with `fingerprint`, when given)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state.get("step") if fingerprint is None or state.get("fingerprint") == fingerprint else None


def _replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing what was there. The old folder is renamed aside
    first, so a kill leaves one of the two complete under one of the names."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    if old.exists():
        shutil.rmtree(old)


def _restore_best_adapter(resume_from: Path | None, best_dir: Path, last_dir: Path, fingerprint: str) -> None:
    """A fresh training starts without adapters of an older one; a resumed one gets back the best
    adapter as of its checkpoint (a later one the killed run saved is trained again)."""
    if resume_from is None:
        for folder in (best_dir, last_dir):
            if folder.exists():
                shutil.rmtree(folder)
        return
    state = json.loads((resume_from / STATE_FILE).read_text())
    if state.get("best_step") is None or not (resume_from / BEST_IN_CHECKPOINT).exists():
        if best_dir.exists():
            shutil.rmtree(best_dir)
    elif _adapter_step(best_dir, fingerprint) != state["best_step"]:
        staged = best_dir.with_name(f".{best_dir.name}.partial")
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        shutil.copyfile(resume_from / "adapter_config.json", staged / "adapter_config.json")
        shutil.copyfile(resume_from / BEST_IN_CHECKPOINT, staged / ADAPTER_WEIGHTS)
        write_json(staged / STATE_FILE, {"schema_version": 1, "step": state["best_step"],
                                         "eval_loss": state["best_eval_loss"], "fingerprint": fingerprint})
        _replace_dir(staged, best_dir)


# --- selection and the curves' statistics ---------------------------------------------------


def _point(step: int, eval_curve: list[dict], train_curve: list[dict]) -> dict[str, Any]:
    """An adapter's step with its validation loss there and the training loss last logged by then."""
    evals = [e["eval_loss"] for e in eval_curve if e["step"] == step]
    trained = [h for h in train_curve if h["step"] <= step]
    return {"step": step, "eval_loss": evals[-1] if evals else None,
            "train_loss": trained[-1]["loss"] if trained else None,
            "train_loss_step": trained[-1]["step"] if trained else None}


def select_adapter(select: str, best: dict | None, last: dict) -> dict[str, Any]:
    """Which adapter goes to save.lora_path, and why."""
    if best is None:
        adapter, reason = "last", "no validation split: the last adapter is kept"
    elif select == "last":
        adapter, reason = "last", f"training.select is last: the adapter at step {last['step']}"
    elif best["step"] == last["step"]:
        adapter, reason = "best", f"the last adapter (step {last['step']}) has the lowest validation loss"
    else:
        adapter = "best"
        reason = (f"the adapter at step {best['step']} has the lowest validation loss ({best['eval_loss']:.4g}); "
                  f"the last one, at step {last['step']}, has {_fmt(last['eval_loss'])}")
    chosen = best if adapter == "best" else last
    return {"select": select, "adapter": adapter, "reason": reason, "step": chosen["step"],
            "eval_loss": chosen["eval_loss"], "train_loss": chosen["train_loss"], "best": best, "last": last}


def fitted_change(points: list[tuple[float, float]], reference: float | None) -> float | None:
    """How much the least-squares line through (step, loss) points rises (+) or falls (-) from
    the first point's step to the last one's, relative to `reference`: a trend over the whole
    window, not a difference of two points."""
    import numpy as np

    if len(points) < 2 or not reference or points[0][0] == points[-1][0]:
        return None
    steps, values = np.array(points, dtype=float).T
    slope = np.polyfit(steps, values, 1)[0]
    return float(slope * (steps[-1] - steps[0]) / reference)


def convergence(train_curve: list[dict], eval_curve: list[dict], selection: dict,
                window_fraction: float = 0.1) -> dict[str, Any]:
    """Did the loss fall, and is it not rising at the end? On the validation curve up to the
    selected adapter when there is one, else on the training loss."""
    if selection["best"] is not None:
        points = [(e["step"], e["eval_loss"]) for e in eval_curve
                  if e["step"] <= selection["step"] and math.isfinite(e["eval_loss"])]
        if len(points) >= 2:
            window = max(TREND_MIN_POINTS, math.ceil(len(points) * CONVERGENCE_WINDOW_FRACTION))
            first, last = points[0][1], selection["eval_loss"]
            return {
                "curve": "validation",
                "points": len(points),
                "window": min(window, len(points)),
                "first_window_loss": first,
                "last_window_loss": last,
                "loss_drop": (first - last) / first if first else None,
                "last_window_change": fitted_change(points[-window:], first),
            }
    points = [(h["step"], h["loss"]) for h in train_curve if math.isfinite(h["loss"])]
    if len(points) < 2:
        return {"curve": "training", "points": len(points), "window": None, "first_window_loss": None,
                "last_window_loss": None, "loss_drop": None, "last_window_change": None}
    window = max(1, math.ceil(len(points) * window_fraction))
    first = sum(v for _, v in points[:window]) / window
    last = sum(v for _, v in points[-window:]) / window
    return {
        "curve": "training",
        "points": len(points),
        "window": window,
        "first_window_loss": first,
        "last_window_loss": last,
        "loss_drop": (first - last) / first if first else None,
        "last_window_change": fitted_change(points[-max(TREND_MIN_POINTS, window):], first),
    }


def validation(eval_curve: list[dict], train_curve: list[dict], selection: dict, stopped_early: bool) -> dict[str, Any]:
    """The validation curve's verdicts: the selected adapter against the lowest loss, and
    overfitting: the validation loss rising over the evaluations since its lowest one (at least
    the last three) while the training loss fell."""
    points = [(e["step"], e["eval_loss"]) for e in eval_curve if math.isfinite(e["eval_loss"])]
    best, last = selection["best"], selection["last"]
    since_best = next(i for i, (step, _) in enumerate(points) if step == best["step"])
    window = points[min(since_best, len(points) - TREND_MIN_POINTS):]
    trained = [(h["step"], h["loss"]) for h in train_curve
               if window and window[0][0] <= h["step"] <= window[-1][0] and math.isfinite(h["loss"])]
    eval_change = fitted_change(window, best["eval_loss"])
    train_change = fitted_change(trained, trained[0][1] if trained else None)
    rising = eval_change is not None and train_change is not None and eval_change > 0 and train_change < 0
    return {
        "evaluations": len(eval_curve),
        "initial_loss": eval_curve[0]["eval_loss"] if eval_curve else None,
        "initial_step": eval_curve[0]["step"] if eval_curve else None,
        "best_loss": best["eval_loss"],
        "best_step": best["step"],
        "last_loss": last["eval_loss"],
        "selected_loss": selection["eval_loss"],
        "above_best": (selection["eval_loss"] - best["eval_loss"]) / best["eval_loss"]
        if selection["eval_loss"] is not None and best["eval_loss"] else None,
        "trend_window": {"evaluations": len(window), "from_step": window[0][0] if window else None,
                         "to_step": window[-1][0] if window else None},
        "eval_change": eval_change,
        "train_change": train_change,
        "rising_while_training_falls": rising,
        "stopped_early": stopped_early,
        # what the gate judges: the rise, unless early stopping already ended the run on it
        "overfit_rise": eval_change if rising and not stopped_early else 0.0,
    }


def _fmt(value: float | None) -> str:
    return "no evaluation" if value is None else f"{value:.4g}"


# Keys that change neither the steps trained nor their evaluations: a run resumes through a change of them.
NOT_IN_CHECKPOINT_FINGERPRINT = ("select", "report_to")


def _fingerprint(cfg: FactoryConfig, ws: Workspace, train_file: Path, val_file: Path, resolved, model) -> str:
    digest = xxhash.xxh3_128()
    # the trained weights by name and shape: another factory or PEFT version may adapt other
    # layers for the same config, and the optimizer state of a checkpoint then fits no longer
    digest.update(repr([(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]).encode())
    sections = {s: cfg.section(s) for s in ("model", "lora", "training", "dataset")}
    for key in NOT_IN_CHECKPOINT_FINGERPRINT:
        sections["training"].pop(key)
    # the processes count through `resolved` (world_size); how they share the model changes the checkpoint's files
    sections["training"]["distributed"] = {"strategy": cfg.training.distributed.strategy}
    digest.update(orjson.dumps(sections, option=orjson.OPT_SORT_KEYS))
    # model.name can stay while the model changes (a folder rebuilt, a new hub commit): a
    # checkpoint's adapter fits the weights it was trained on only
    cache = HashCache(ws)  # the run's digests: the split files are not read again, nor held whole in memory
    digest.update(base_model_identity(cfg, ws, cache).encode())
    digest.update(repr(resolved).encode())
    digest.update(f"{cache.path_digest(train_file)}\0{cache.path_digest(val_file)}".encode())
    return digest.hexdigest()


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
