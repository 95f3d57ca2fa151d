"""The finetune phase's progress checkpoints (training.output_dir/checkpoint-N): which one a
killed run resumes from, and which ones `--restart` may remove.

A checkpoint is usable when its training_state.json (written last, after the trainer's own
files) exists and every file in it reads back whole: a safetensors file as long as its header
says, a torch archive that passes its CRC checks, JSON that parses. A damaged one (a run
killed while saving, a full disk, a truncated copy) is skipped with a warning and the one
before it is used. Each checkpoint folder is recorded as the factory's before the trainer
writes it, so `--restart` removes exactly those, never the folder around them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from factory.errors import UnsafePath
from factory.io import damaged_file_problem
from factory.workspace import Workspace, created_under, record_created, remove_created

STATE_FILE = "training_state.json"  # written last: a checkpoint without it is incomplete
PREFIX = "checkpoint-"


def _checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None: it can)."""
    if not (checkpoint / STATE_FILE).is_file():
        return f"incomplete: no {STATE_FILE} (the run stopped while saving it)"
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        trouble = damaged_file_problem(file)
        if trouble:
            return f"{file.relative_to(checkpoint)} is damaged: {trouble}"
    return None


def last_complete(output_dir: Path, fingerprint: str, log: logging.Logger) -> Path | None:
    """The newest usable checkpoint made with this config, data and base model, or None (start over)."""
    for checkpoint in _checkpoints(output_dir):
        trouble = problem(checkpoint)
        if trouble:
            log.warning("skipping checkpoint %s: %s; trying the one before it", checkpoint.name, trouble)
            continue
        if json.loads((checkpoint / STATE_FILE).read_text()).get("fingerprint") != fingerprint:
            log.info("checkpoints in %s are from another config, data, base model or trained layers; starting over", output_dir)
            return None
        return checkpoint
    return None


def remove_all(ws: Workspace, output_dir: Path, log: logging.Logger) -> None:
    """`--restart`: remove the checkpoints the factory wrote; refuse (exit 2) when the folder
    holds a checkpoint-N it did not record, since a resume could otherwise take it."""
    recorded = {p for p in created_under(ws, output_dir) if p.name.startswith(PREFIX)}
    foreign = [c for c in _checkpoints(output_dir) if c not in recorded]
    if foreign:
        raise UnsafePath(f"--restart: {', '.join(ws.rel(c) for c in foreign)} in training.output_dir was not written "
                         f"by the factory; nothing was removed. Move it away, or point training.output_dir elsewhere")
    for checkpoint in sorted(recorded):
        if checkpoint.exists():
            log.info("--restart: removing %s", ws.rel(checkpoint))
        remove_created(ws, checkpoint, "training.output_dir")


def recorder(ws: Workspace, output_dir: Path):
    """A TrainerCallback that records each checkpoint folder as the factory's just before the
    trainer writes it (the trainer decides to save in on_step_end, then saves), and as finished
    once saved; add it before the callback that writes training_state.json. A folder still
    unfinished when a run fails or is killed is removed by the runner."""
    from transformers import TrainerCallback

    class CheckpointRecorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                folder = output_dir / f"{PREFIX}{state.global_step}"
                record_created(ws, folder, unfinished=True)  # before it exists: never a folder unrecorded
                folder.mkdir(parents=True, exist_ok=True)

        def on_save(self, args, state, control, **kwargs):
            # The trainer's files are written. Finished before training_state.json follows (a
            # later callback), so a kill in between never discards a complete checkpoint; one
            # without that file is skipped at resume.
            record_created(ws, output_dir / f"{PREFIX}{state.global_step}", whole=True)

    return CheckpointRecorder()
