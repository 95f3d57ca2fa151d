"""Where everything lives in a workspace. One place, so no module invents a path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_NAMES = ("factory.yaml", "factory.yml", "factory.json")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: Path | str) -> "Workspace":
        return cls(Path(root).resolve())

    def path(self, relative: str | Path) -> Path:
        """A user-given path: absolute stays absolute, relative is under the workspace."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else self.root / p

    def rel(self, path: Path) -> str:
        """How to show a path to the user: relative to the workspace when inside it."""
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    @property
    def config_file(self) -> Path:
        for name in CONFIG_NAMES:
            if (self.root / name).exists():
                return self.root / name
        return self.root / CONFIG_NAMES[0]

    # engine state
    @property
    def state_dir(self) -> Path:
        return self.root / ".factory"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @property
    def training_status_file(self) -> Path:
        return self.state_dir / "training-status.json"

    @property
    def training_history_file(self) -> Path:
        return self.state_dir / "training-history.jsonl"

    @property
    def fingerprints_dir(self) -> Path:
        return self.state_dir / "fingerprints"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "run.lock"

    # data
    @property
    def formatted_dir(self) -> Path:
        return self.root / "data" / "formatted"

    @property
    def formatted_file(self) -> Path:
        return self.formatted_dir / "all.jsonl"

    @property
    def rejects_file(self) -> Path:
        return self.formatted_dir / "rejects.jsonl"

    @property
    def duplicates_file(self) -> Path:
        return self.formatted_dir / "duplicates.jsonl"

    @property
    def contaminated_file(self) -> Path:
        return self.formatted_dir / "contaminated.jsonl"

    @property
    def splits_dir(self) -> Path:
        return self.root / "data" / "splits"

    def split_file(self, name: str) -> Path:
        return self.splits_dir / f"{name}.jsonl"

    # metrics and gates
    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def metrics_file(self, stem: str) -> Path:
        return self.metrics_dir / f"{stem}.json"

    @property
    def gate_results_dir(self) -> Path:
        return self.metrics_dir / "gates"

    @property
    def gates_dir(self) -> Path:
        """User-editable gate files; a file here overrides the packaged one of that name."""
        return self.root / "gates"

    # models and logs
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def adapter_dir(self, which: str) -> Path:
        """An adapter finetune keeps besides save.lora_path: `best` (lowest validation loss) or
        `last` (end of training), seed 000's adapters/best and adapters/last."""
        return self.models_dir / "checkpoints" / which

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"
