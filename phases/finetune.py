"""finetune: LoRA fine-tuning on the train split, with Unsloth (CUDA) or TRL + PEFT (anywhere).

Reads top to bottom like a recipe:

1. pick the backend (unsloth when CUDA and unsloth are there, else hf) and say why;
2. resolve `auto` values (seed 004's VRAM table), load the base model, add LoRA adapters;
3. build the training set so that loss falls on assistant tokens only, with the model's chat
   format (factory.chat, read from its own template): on hf as token ids and labels (every
   assistant turn and its end-of-turn token trained, the rest -100); on unsloth through seed
   004's text formatting and `train_on_responses_only` with the markers the chat format found;
4. train with TRL's SFTTrainer, saving progress checkpoints at 25/50/75/100% of the steps
   (seed 003), each with a training_state.json; a killed run resumes from the last complete
   one; live state goes to .factory/training-status.json through the runner;
5. save the adapter and tokenizer to save.lora_path and return the training statistics
   (metrics/training-stats.json) that the training-completed gate checks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import resource
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import xxhash

from factory import checkpoints, modeling
from factory.config import FactoryConfig
from factory.errors import InputError
from factory.io import file_sha256, write_json
from factory.phase import TRAINING_LIBRARIES, Phase, PhaseContext
from factory.workspace import Workspace, output_folder, staged_dir

CHECKPOINT_FRACTION = 0.25  # seed 003: checkpoints at 25, 50, 75 and 100% of training
STATE_FILE = checkpoints.STATE_FILE  # written last: a checkpoint without it is incomplete


def run(ctx: PhaseContext) -> dict[str, Any]:
    from factory import plan

    cfg, ws, log = ctx.config, ctx.workspace, ctx.log
    train_file = ws.split_file("train")
    if not train_file.exists():
        raise InputError(f"{ws.rel(train_file)} not found; run `factory run split` first")
    records = [orjson.loads(line) for line in train_file.read_bytes().splitlines() if line.strip()]
    if not records:
        raise InputError(f"{ws.rel(train_file)} is empty; check the split phase's metrics/split.json")

    # 1. backend
    backend = modeling.select_backend(cfg.model.backend)
    log.info("backend %s on %s: %s", backend.name, backend.device, backend.reason)
    ctx.training.update(backend=backend.name, backend_reason=backend.reason)

    # 2. model and adapters, seeded first: LoRA's initial weights are random draws (both backends)
    resolved = plan.resolve(cfg, plan.accelerator_memory_gib())
    from transformers import set_seed  # after select_backend: unsloth must be imported first

    set_seed(cfg.training.seed)  # python, numpy and torch on every device
    model, chat = modeling.load_model(cfg, ws, backend, max_seq_length=resolved.max_seq_length)
    model = modeling.add_lora(model, cfg, backend, rank=resolved.rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d: %d trainable parameters; batch %d x %d accumulation, max length %d", resolved.rank,
             trainable, resolved.batch_size, resolved.gradient_accumulation_steps, resolved.max_seq_length)

    # 3. checkpoints from an earlier, interrupted run of the same config and data
    output_dir = output_folder(ws, ws.path(cfg.training.output_dir), "training.output_dir")
    fingerprint = _fingerprint(cfg, train_file, resolved)
    if ctx.options.get("restart"):
        checkpoints.remove_all(ws, output_dir, log)
    resume_from = checkpoints.last_complete(output_dir, fingerprint, log)

    # 4. trainer
    trainer = _build_trainer(cfg, ws, backend, model, chat, records, resolved, output_dir, log)
    trainer.add_callback(checkpoints.recorder(ws, output_dir))
    tracker = _make_status_callback()(ctx, fingerprint, ws)
    trainer.add_callback(tracker)
    if resume_from:
        log.info("resuming from %s", ws.rel(resume_from))
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.monotonic() - started

    # 5. adapter, tokenizer, statistics
    lora_dir = ws.path(cfg.save.lora_path)
    with staged_dir(ws, lora_dir, "save.lora_path") as staging:  # never a half-written adapter in place
        model.save_pretrained(str(staging))
        chat.tokenizer.save_pretrained(str(staging))
    history = [
        {"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"), "epoch": e.get("epoch")}
        for e in trainer.state.log_history if "loss" in e
    ]
    state = trainer.state
    tokens = int(state.num_input_tokens_seen or 0) - tracker.resumed_tokens  # this run's share
    return {
        "completed": state.global_step >= state.max_steps,
        "backend": backend.name,
        "backend_reason": backend.reason,
        "device": backend.device,
        "model": cfg.model.name,
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "epochs": state.epoch,
        "resumed_from_step": tracker.resumed_step,
        "final_loss": history[-1]["loss"] if history else None,
        "loss_history": history,
        "nonfinite_losses": sum(1 for h in history if not math.isfinite(h["loss"])),
        "convergence": convergence(history),
        "tokens": tokens,
        "tokens_note": "trained in this run (since resumed_from_step); tokens_per_second is over the same span",
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds and tokens else None,
        "peak_memory_mb": _peak_memory_mb(backend.device),
        "trainable_parameters": trainable,
        "resolved": dataclasses.asdict(resolved),
        "adapter": ws.rel(lora_dir),
        "train_records": len(records),
        "chat_format": {"template": chat.template_source, "end_of_turn": chat.eot_token,
                        "end_of_turn_appended": chat.eot_appended, "stop_token_ids": chat.stop_token_ids,
                        "pad_token": chat.tokenizer.pad_token, "instruction_part": chat.instruction_part,
                        "response_part": chat.response_part},
        "train_sha256": file_sha256(train_file),
    }


PHASE = Phase(
    name="finetune",
    summary="Fine-tune LoRA adapters on the train split",
    metrics="training-stats",
    run=run,
    config_sections=("model", "lora", "training", "dataset", "save.lora_path"),
    inputs=lambda cfg, ws: [ws.split_file("train"), *modeling.local_model_inputs(cfg, ws)],
    outputs=lambda cfg, ws: [ws.path(cfg.save.lora_path)],
    libraries=TRAINING_LIBRARIES,
)


# --- training set and trainer ---------------------------------------------------------------


def _build_trainer(cfg: FactoryConfig, ws: Workspace, backend, model, chat, records: list[dict], resolved, output_dir: Path,
                   log):
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
        report_to="none",
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
    )
    if backend.name == "unsloth":
        # Seed 004, steps 4-5: chat-template text (BOS left to the tokenizer), then mask
        # everything but the model's turns with train_on_responses_only, given the markers
        # the chat format read off this model's template.
        from unsloth.chat_templates import train_on_responses_only

        trainer = SFTTrainer(model=model, processing_class=chat.tokenizer, train_dataset=_text_dataset(chat, records),
                             args=SFTConfig(dataset_text_field="text", **args))
        return train_on_responses_only(trainer, instruction_part=chat.instruction_part,
                                       response_part=chat.response_part)

    dataset, dropped = _token_dataset(chat, records, resolved.max_seq_length)
    if dropped:
        log.warning("%d of %d training records have no answer token within max_seq_length %d and are left out",
                    dropped, len(records), resolved.max_seq_length)
    if not len(dataset):
        raise InputError(f"no training record has an answer token within model.max_seq_length "
                         f"({resolved.max_seq_length}); raise it")
    trainer_class = SFTTrainer if cuda else _cpu_safe_trainer()
    # Already tokenized and cut: TRL's own preparation (and its progress bars) is skipped,
    # except for packing, which it does.
    prepared = {} if t.packing else {"dataset_kwargs": {"skip_prepare_dataset": True}}
    return trainer_class(model=model, processing_class=chat.tokenizer, train_dataset=dataset,
                         args=SFTConfig(**args, **prepared))


def _token_dataset(chat, records: list[dict], max_length: int) -> tuple[Any, int]:
    """input_ids and labels from the chat format, cut to max_length: what the hf backend
    trains on. Also returns how many records were left with no trained token by the cut."""
    from datasets import Dataset

    rows, dropped = [], 0
    for record in records:
        example = chat.training_example(record)
        example = {key: values[:max_length] for key, values in example.items()}
        if any(label != -100 for label in example["labels"]):
            rows.append(example)
        else:
            dropped += 1
    return Dataset.from_list(rows), dropped


def _text_dataset(chat, records: list[dict]):
    """Rendered conversations without a leading BOS (the tokenizer adds it): the unsloth backend."""
    from datasets import Dataset

    from factory.chat import messages

    bos = chat.tokenizer.bos_token or "\0"
    return Dataset.from_list([{"text": chat.render(messages(r["conversations"]), generation_prompt=False).removeprefix(bos)}
                              for r in records])


def _cpu_safe_trainer():
    """TRL 1.15's SFTTrainer.compute_loss calls a Triton kernel that CPU torch lacks
    (`'NoneType' object has no attribute 'apply'`); off CUDA, take transformers' own loss and
    keep the token accuracy SFTTrainer logs."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    class CPUSafeSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            with torch.no_grad():
                labels = inputs["labels"][:, 1:]
                mask = labels != -100
                correct = (outputs.logits[:, :-1].argmax(-1) == labels) & mask
                mode = "train" if model.training else "eval"
                self._metrics[mode]["mean_token_accuracy"].append((correct.sum() / mask.sum().clamp(min=1)).item())
            return (loss, outputs) if return_outputs else loss

    return CPUSafeSFTTrainer


# --- live status and progress checkpoints ---------------------------------------------------


def _make_status_callback():
    from transformers import TrainerCallback

    class StatusCallback(TrainerCallback):
        """Feeds .factory/training-status.json (through the runner), the phase's progress bar,
        logs/training.log, and writes training_state.json into each checkpoint."""

        def __init__(self, ctx: PhaseContext, fingerprint: str, ws: Workspace):
            self.ctx, self.fingerprint, self.ws = ctx, fingerprint, ws
            self.resumed_step = 0
            self.resumed_tokens = 0
            self._t0 = time.monotonic()
            self._last = {"loss": None, "learning_rate": None}
            ws.logs_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(ws.logs_dir / "training.log", "a", encoding="utf-8")

        def on_train_begin(self, args, state, control, **kwargs):
            self.resumed_step = state.global_step
            self.resumed_tokens = int(state.num_input_tokens_seen or 0)
            self._t0 = time.monotonic()
            self.ctx.progress.start(state.max_steps, "steps")
            self.ctx.progress.advance(state.global_step)
            self.ctx.training.update(step=state.global_step, total_steps=state.max_steps,
                                     epoch=float(state.epoch or 0), total_epochs=float(state.num_train_epochs))
            self._write_log({"event": "train_begin", "step": state.global_step, "total_steps": state.max_steps})

        def on_step_end(self, args, state, control, **kwargs):
            self.ctx.progress.advance(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            self._last = {"loss": float(logs["loss"]), "learning_rate": float(logs.get("learning_rate", 0.0))}
            done = state.global_step - self.resumed_step
            elapsed = time.monotonic() - self._t0
            eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
            self.ctx.training.update(step=state.global_step, epoch=float(state.epoch or 0), eta_seconds=eta,
                                     **self._last)
            self._write_log({"step": state.global_step, "epoch": state.epoch, **logs})

        def on_save(self, args, state, control, **kwargs):
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
                **self._last,
            })
            self.ctx.training.update(checkpoint_at=now)
            self._write_log({"event": "checkpoint", "step": state.global_step, "path": self.ws.rel(checkpoint)})

        def on_train_end(self, args, state, control, **kwargs):
            self._write_log({"event": "train_end", "step": state.global_step})
            self._log.close()

        def _write_log(self, entry: dict) -> None:
            self._log.write(json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **entry}) + "\n")
            self._log.flush()

    return StatusCallback


def convergence(history: list[dict], window_fraction: float = 0.1) -> dict[str, Any]:
    """Loss at the start vs the end of training, and whether it is still rising at the end."""
    losses = [h["loss"] for h in history if math.isfinite(h["loss"])]
    if len(losses) < 2:
        return {"first_window_loss": None, "last_window_loss": None, "loss_drop": None, "last_window_change": None}
    window = max(1, math.ceil(len(losses) * window_fraction))
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    tail = losses[-max(2, window):]
    half = len(tail) // 2
    early, late = sum(tail[:half]) / half, sum(tail[half:]) / (len(tail) - half)
    return {
        "window": window,
        "first_window_loss": first,
        "last_window_loss": last,
        "loss_drop": (first - last) / first if first else None,
        "last_window_change": (late - early) / first if first else None,
    }


def _fingerprint(cfg: FactoryConfig, train_file: Path, resolved) -> str:
    digest = xxhash.xxh3_128()
    digest.update(orjson.dumps({s: cfg.section(s) for s in ("model", "lora", "training", "dataset")},
                               option=orjson.OPT_SORT_KEYS))
    digest.update(repr(resolved).encode())
    digest.update(train_file.read_bytes())
    return digest.hexdigest()


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux

