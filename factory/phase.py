"""The contract between the runner and a phase.

A phase is one module in `phases/` that exposes `PHASE = Phase(...)`. Its `run` reads
the config and its inputs, writes its artifacts, reports progress through the context, and
returns its metrics as a dict. The runner owns everything else: it writes the returned
metrics to metrics/<metrics>.json, checks the gates attached to the phase, keeps the
fingerprints that let an unchanged phase be skipped, and writes the status files.
Phases never write status and never read gates.

A phase replaces its outputs whole (factory.workspace.staged_dir for a folder,
factory.io.AtomicOutput for a file): a run killed or out of disk halfway leaves the previous
output or nothing, never half of one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from factory.config import FactoryConfig
from factory.workspace import Workspace


class Progress(Protocol):
    """How a phase reports progress; cheap enough to call every few thousand records."""

    def start(self, total: int | None, unit: str) -> None: ...

    def advance(self, n: int = 1) -> None: ...


@dataclass
class TrainingReporter(Protocol):
    """Live training state (.factory/training-status.json); the runner owns the file."""

    def update(self, **fields: Any) -> None: ...


@dataclass
class PhaseContext:
    config: FactoryConfig
    workspace: Workspace
    progress: Progress
    log: logging.Logger
    run_id: str = ""
    training: TrainingReporter | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """Per-invocation switches from the command line, e.g. {"restart": True} for finetune."""
    rank: int = 0
    """This process's number among world_size processes running the phase (factory.distributed);
    rank 0 alone writes the phase's artifacts and reports to `progress` and `training`."""
    world_size: int = 1


@dataclass(frozen=True)
class Phase:
    name: str
    summary: str
    metrics: str
    """Stem of the metrics file the runner writes from run()'s result: metrics/<metrics>.json."""

    run: Callable[[PhaseContext], dict[str, Any]]

    config_sections: tuple[str, ...] = ()
    """Config sections ("lora") or keys ("save.lora_path") whose values change this phase's
    output (part of its fingerprint)."""

    inputs: Callable[[FactoryConfig, Workspace], list[Path]] = field(default=lambda cfg, ws: [])
    """Files (or folders) whose content is part of the fingerprint."""

    outputs: Callable[[FactoryConfig, Workspace], list[Path]] = field(default=lambda cfg, ws: [])
    """Artifacts that must still exist for the phase to be skipped. The runner checks, before
    the phase runs, that it may replace each (factory.workspace.check_replaceable), and records
    them as the factory's after a success."""

    libraries: tuple[str, ...] = ()
    """Distributions whose installed versions are part of the fingerprint (e.g. "torch")."""

    distributed: bool = False
    """Whether training.distributed may run it in several processes under torchrun
    (factory.distributed); every other phase runs in the runner's process."""

    after_gates: Callable[[FactoryConfig, Workspace], list[Path]] | None = None
    """Run by the runner once the phase's gates have passed (also when it was skipped as
    unchanged): what is only true of an output that earned it, e.g. model cards. Returns the
    files written."""


# The libraries whose versions change what a model phase computes (absent ones count as None).
MODEL_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "unsloth", "unsloth_zoo",
                   "bitsandbytes")
TRAINING_LIBRARIES = MODEL_LIBRARIES + ("trl", "datasets")
GGUF_LIBRARIES = MODEL_LIBRARIES + ("llama-cpp-python",)

