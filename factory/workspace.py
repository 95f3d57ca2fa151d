"""Where everything lives in a workspace (one place, so no module invents a path), and what
the factory may remove there.

Config-given output paths (save.lora_path, save.merged_path, save.gguf_path,
training.output_dir) can point anywhere, `.` and `models` included. The factory never
removes a path just because the config names it: it records every folder and file it
creates in .factory/created.json, and replaces or removes only those, refusing (exit 2) a
path that is the workspace, an ancestor of it, or holds files the factory did not write.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import orjson

from factory.errors import UnsafePath

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
        """How to show a path to the user: relative to the workspace when inside it, a hub
        dataset's file as its hf:// address."""
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            from factory.hub import cache_uri

            return cache_uri(path) or str(path)

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

    @property
    def created_file(self) -> Path:
        """What the factory created outside .factory/ (see `record_created`)."""
        return self.state_dir / "created.json"

    @property
    def hash_cache_file(self) -> Path:
        return self.state_dir / "hash-cache.json"

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


# --- what the factory created, and may therefore replace --------------------------------------

WHOLE = "*"  # a folder whose every file is the factory's (a checkpoint the trainer writes, a staging folder)


def _created(ws: Workspace) -> dict[str, dict]:
    try:
        return orjson.loads(ws.created_file.read_bytes())["paths"]
    except (FileNotFoundError, orjson.JSONDecodeError, KeyError, TypeError):
        return {}


def _save_created(ws: Workspace, paths: dict[str, dict]) -> None:
    from factory.io import write_json

    write_json(ws.created_file, {"schema_version": 1, "paths": dict(sorted(paths.items()))})


def _key(ws: Workspace, path: Path) -> str:
    return ws.rel(Path(os.path.abspath(path)))


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def record_created(ws: Workspace, path: Path, *, whole: bool = False, unfinished: bool = False) -> None:
    """Note that the factory wrote `path`: a file, or a folder and the files now in it, or
    (`whole`) a folder all of whose content is the factory's. `unfinished=True` before a
    folder is filled: a run that fails or is killed halfway leaves a folder that the next run
    removes (`discard_unfinished`); record it again, finished, once it is complete."""
    path = Path(path)
    if path.is_file():
        entry: dict = {"kind": "file"}
    else:
        entry = {"kind": "dir", "files": WHOLE if whole or unfinished else _files_under(path)}
        if unfinished:
            entry["unfinished"] = True
    paths = _created(ws)
    paths[_key(ws, path)] = entry
    _save_created(ws, paths)


def forget_created(ws: Workspace, path: Path) -> None:
    paths = _created(ws)
    if paths.pop(_key(ws, path), None) is not None:
        _save_created(ws, paths)


def created_under(ws: Workspace, folder: Path) -> list[Path]:
    """The recorded paths directly inside `folder` (e.g. the checkpoints in training.output_dir)."""
    folder = Path(os.path.abspath(folder))
    return sorted(ws.path(key) for key in _created(ws) if Path(os.path.abspath(ws.path(key))).parent == folder)


# The config keys that name where the factory writes (and may later replace what it wrote).
OUTPUT_SETTINGS = ("training.output_dir", "save.lora_path", "save.merged_path", "save.gguf_path")


def output_settings(cfg, ws: Workspace) -> dict[Path, str]:
    """Each output folder the config names, checked with `output_folder`, and its key."""
    return {output_folder(ws, ws.path(cfg.section(key)), key): key for key in OUTPUT_SETTINGS}


def output_folder(ws: Workspace, path: Path, setting: str) -> Path:
    """`path` as an absolute path, or UnsafePath when it is the workspace, a folder that
    contains it, the home folder or the file system's root: no place for the factory's output
    (a trainer writes files such as README.md into its output folder; replacing it would take
    everything with it)."""
    path = Path(os.path.abspath(path))
    if path == ws.root or path in ws.root.parents or path in (Path.home(), Path(path.anchor)):
        shown = f"{setting} ({path})" if setting else str(path)
        raise UnsafePath(f"{shown} is the workspace or a folder that contains it; the factory will not replace it "
                         f"or write into it. Point {setting or 'it'} at a folder of its own, e.g. models/checkpoints/NAME")
    return path


def check_replaceable(ws: Workspace, path: Path, setting: str) -> None:
    """Raise UnsafePath unless the factory may replace `path` (`setting` names the config key
    it came from): it must not be the workspace or an ancestor of it (nor the file system's
    root or the home folder), nor hold anything the factory did not write."""
    path = output_folder(ws, path, setting)
    shown = f"{setting} ({path})" if setting else str(path)
    if path.is_symlink():
        raise UnsafePath(f"{shown} is a symbolic link; the factory replaces only what it created. "
                         f"Point {setting or 'it'} at a plain folder")
    if not path.exists():
        return
    entry = _created(ws).get(_key(ws, path))
    if entry is None:
        raise UnsafePath(f"{shown} already exists and was not written by the factory; nothing was removed. "
                         f"Move it away, or point {setting or 'it'} elsewhere")
    if path.is_dir() and entry.get("files") != WHOLE:
        foreign = sorted(set(_files_under(path)) - set(entry.get("files", [])))
        if foreign:
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UnsafePath(f"{shown} holds files the factory did not write ({listed}); nothing was removed. "
                             f"Move them away, or point {setting or 'it'} elsewhere")


def remove_created(ws: Workspace, path: Path, setting: str = "") -> None:
    """Remove a file or folder the factory created (after check_replaceable), and its record."""
    path = Path(path)
    check_replaceable(ws, path, setting)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    forget_created(ws, path)


def discard_unfinished(ws: Workspace) -> list[str]:
    """Remove what the factory began to write and never finished (a checkpoint or a staging
    folder of a run that failed or was killed): it only holds disk space. Returns their names."""
    removed = []
    for key, entry in _created(ws).items():
        if entry.get("unfinished"):
            path = ws.path(key)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            forget_created(ws, path)
            removed.append(key)
    return removed


def remove_if_created(ws: Workspace, path: Path) -> bool:
    """Remove `path` when the factory created it (and it holds nothing else); False otherwise."""
    try:
        remove_created(ws, path)
    except UnsafePath:
        return False
    return True


@contextmanager
def staged_dir(ws: Workspace, target: Path, setting: str) -> Iterator[Path]:
    """A folder to write `target`'s new content into; on success it takes `target`'s place
    (the old content is removed only then, and only if the factory wrote it), on any error or
    interruption it is removed. So `target` is always either the old whole folder or the new
    whole folder, never a half-written one.

        with staged_dir(ws, lora_dir, "save.lora_path") as staging:
            model.save_pretrained(staging)
    """
    target = Path(os.path.abspath(target))
    check_replaceable(ws, target, setting)  # refuse before any work is done
    staging = target.with_name(f".{target.name}.partial")
    if staging.exists():
        remove_created(ws, staging, f"{setting} (staging folder)")
    try:
        # recorded before it exists: a Ctrl-C while it is being recorded leaves no folder unrecorded
        record_created(ws, staging, unfinished=True)
        staging.mkdir(parents=True)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        forget_created(ws, staging)
        raise
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        check_replaceable(ws, target, setting)
        if old.exists():
            remove_created(ws, old)
        record_created(ws, old, unfinished=True)  # first, as the staging folder's
        os.replace(target, old)
    os.replace(staging, target)
    forget_created(ws, staging)
    record_created(ws, target)
    if old.exists():
        shutil.rmtree(old)
        forget_created(ws, old)
