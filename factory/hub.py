"""A hub model id (model.name: owner/name), resolved to the commit a run uses, before any phase
loads it; and hub datasets as inputs (hf://datasets/OWNER/NAME/PATTERN), downloaded into the
hub cache.

Asked once per run, when the fingerprints are computed: the hub's current commit of the
repo's main branch when the hub answers; the cached commit when HF_HUB_OFFLINE is set or the
hub cannot be reached (a warning says so). A repo that is unknown, gated or private, or that
is neither reachable nor cached, is an InputError (exit 2) at once, naming model.name and the
ways to run offline, instead of a library's retries ending in an OSError.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

from factory.errors import InputError

log = logging.getLogger("factory.hub")
TIMEOUT_S = 10.0
OFFLINE_OPTIONS = ("to work offline, set model.name to a local folder with the model (config.json, weights, "
                   "tokenizer), or download it once where the hub is reachable (`hf download OWNER/NAME`) and "
                   "set HF_HUB_OFFLINE=1 to use the cache")


@functools.cache
def resolved_revision(name: str) -> str:
    """The commit of `name` that the model phases will load (see the module docstring)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    from huggingface_hub.utils import validate_repo_id

    try:
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise HFValidationError(name)
        validate_repo_id(name)
    except HFValidationError:
        raise InputError(f"model.name {name!r}: no such folder, and it is not a hub id (owner/name)") from None
    if constants.HF_HUB_OFFLINE:
        cached = cached_revision(name)
        if cached is None:
            raise InputError(f"model.name {name!r}: HF_HUB_OFFLINE is set and the model is not in the hub cache "
                             f"({constants.HF_HUB_CACHE}); {OFFLINE_OPTIONS}")
        return cached
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(name, timeout=TIMEOUT_S).sha
    except GatedRepoError:
        raise InputError(f"model.name {name!r} is a gated model: accept its terms on the hub and set HF_TOKEN "
                         f"to a token of that account; or {OFFLINE_OPTIONS}") from None
    except RepositoryNotFoundError:
        raise InputError(f"model.name {name!r}: the hub has no such model (a typo? a private model needs HF_TOKEN), "
                         f"and there is no local folder of that name in the workspace; or {OFFLINE_OPTIONS}") from None
    except RevisionNotFoundError:
        raise InputError(f"model.name {name!r}: the hub has the repo but not its main revision") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None and status < 500 and status != 429:
            raise InputError(f"model.name {name!r}: the hub refused the request (HTTP {status}); {OFFLINE_OPTIONS}") from None
        reason = f"HTTP {status}" if status else type(e).__name__
    except Exception as e:  # a network failure: connection refused, DNS, timeout, TLS
        reason = _network_reason(e)
    cached = cached_revision(name)
    if cached is None:
        raise InputError(f"model.name {name!r}: the hub ({constants.ENDPOINT}) cannot be reached ({reason}) and the "
                         f"model is not in the hub cache; {OFFLINE_OPTIONS}")
    log.warning("the hub (%s) cannot be reached (%s); using the cached %s at %s", constants.ENDPOINT, reason, name, cached)
    return cached


def cached_revision(name: str) -> str | None:
    """The commit of `name`'s main branch in the local hub cache, or None when not cached."""
    from huggingface_hub import try_to_load_from_cache
    from pathlib import Path

    found = try_to_load_from_cache(name, "config.json")
    if not isinstance(found, str):
        return None
    return Path(found).parent.name  # .../snapshots/<commit>/config.json


def _network_reason(exc: BaseException) -> str:
    if not isinstance(exc, OSError) and exc.__class__.__module__.split(".")[0] not in ("httpx", "httpcore", "requests",
                                                                                        "urllib3", "ssl", "socket"):
        raise exc  # not a network failure: a bug, reported as one
    words = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {words[0][:200]}" if words else type(exc).__name__


DATASET_PREFIX = "hf://datasets/"
DATA_FILE_PATTERNS = [f"*{kind}{compression}" for kind in (".jsonl", ".json", ".csv", ".tsv", ".txt")
                      for compression in ("", ".gz", ".bz2", ".xz")] + ["*.parquet"]
"""What a dataset input without a pattern downloads: the files the format phase reads."""
DATASET_OFFLINE_OPTIONS = ("to work offline, download the files once where the hub is reachable (`hf download "
                           "OWNER/NAME --repo-type dataset`) and set HF_HUB_OFFLINE=1 to use the cache, or put "
                           "the files in data/raw/")


def parse_dataset_uri(uri: str) -> tuple[str, str, str | None]:
    """hf://datasets/OWNER/NAME[@REVISION][/PATTERN] -> (repo id, revision, pattern or None)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    parts = uri[len(DATASET_PREFIX):].split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise InputError(f"{uri}: a hub dataset is hf://datasets/OWNER/NAME, optionally @REVISION after the name "
                         "and a file pattern after it, e.g. hf://datasets/tatsu-lab/alpaca/data/*.parquet")
    name, _, revision = parts[1].partition("@")
    repo = f"{parts[0]}/{name}"
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise InputError(f"{uri}: {repo!r} is not a hub repo id: {e}") from None
    return repo, revision or "main", (parts[2] or None) if len(parts) > 2 else None


@functools.cache
def dataset_snapshot(uri: str, split: str = "train") -> tuple[Path, list[str], bool]:
    """The local folder holding the files of a hub dataset input, the patterns (fnmatch, as the
    hub's own, relative to that folder) of the files to read, and whether the split's files are
    still to be chosen by name among them (split_files).

    Without a pattern in the URI, `split` (train for data, test for a benchmark) is what the
    hub's loader (`datasets`) would load: as the dataset card's `configs` declare it (its default
    configuration's files of that split), else the files named as that split. Only those files are downloaded, into the hub
    cache, once; when HF_HUB_OFFLINE is set or the hub cannot be reached, the cached snapshot is
    used. Errors name the input and the fix (exit 2)."""
    repo, revision, pattern = parse_dataset_uri(uri)
    if pattern:
        return _download(uri, repo, revision, [pattern]), [pattern], False
    card = _download(uri, repo, revision, ["README.md"]) / "README.md"
    patterns = _card_split_patterns(uri, card, split) if card.is_file() else None
    if patterns is None:
        return _download(uri, repo, revision, DATA_FILE_PATTERNS), DATA_FILE_PATTERNS, True
    return _download(uri, repo, revision, patterns), patterns, False


def _download(uri: str, repo: str, revision: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise InputError(f"{uri} is a gated dataset: accept its terms on the hub and set HF_TOKEN to a token of "
                         f"that account; or {DATASET_OFFLINE_OPTIONS}") from None
    except RepositoryNotFoundError:
        raise InputError(f"{uri}: the hub has no dataset {repo} (a typo? a private one needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise InputError(f"{uri}: the dataset {repo} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{uri}: the hub cannot be reached or HF_HUB_OFFLINE is set, and the dataset is not in "
                         f"the hub cache; {DATASET_OFFLINE_OPTIONS}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise InputError(f"{uri}: the hub refused the request (HTTP {status}); {DATASET_OFFLINE_OPTIONS}") from None


def _card_split_patterns(uri: str, card: Path, split: str) -> list[str] | None:
    """The `split` files of the dataset card's default configuration (its YAML `configs`, as
    `datasets` reads them: the only one, the one named `default`, or the one marked `default:
    true`); None when the card declares no configuration, or its default one only a
    `data_dir` (whose files are then chosen by name). A card with several configurations and
    no default, or whose default has no such split (UltraChat's train_sft and train_gen),
    is an InputError that lists them as URIs to pick from."""
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(card) or {}
    except Exception as e:  # a card's YAML the hub would show as broken
        log.warning("%s: the dataset card's metadata cannot be read (%s); the %s split is chosen by file name", uri, e, split)
        return None
    configs = {c.get("config_name", "default"): c for c in metadata.get("configs") or [] if isinstance(c, dict)}
    if not configs:
        return None
    defaults = [name for name, c in configs.items() if len(configs) == 1 or name == "default" or c.get("default")]
    if len(defaults) != 1:
        choices = "; ".join(f"{name}: {_as_uris(uri, _config_splits(c).get(split, []))}"
                            for name, c in list(configs.items())[:8])
        raise InputError(f"{uri}: the dataset has {len(configs)} configurations and none is the default; name the "
                         f"files of one after the dataset's name ({choices}{'; ...' if len(configs) > 8 else ''})")
    splits = _config_splits(configs[defaults[0]])
    if not splits:
        return None
    if split not in splits:
        choices = "; ".join(f"{name}: {_as_uris(uri, paths)}" for name, paths in splits.items())
        raise InputError(f"{uri}: the dataset card names no {split} split ({choices}); name the files of the split "
                         "to use after the dataset's name")
    return splits[split]


def _config_splits(config: dict) -> dict[str, list[str]]:
    """A card configuration's `data_files` as {split: [patterns]}: a pattern or a list of them
    is the train split; a list of {split, path} or a {split: path} mapping names each split.
    Patterns are relative to the configuration's `data_dir`; {} when it has no data_files."""
    data_files, folder = config.get("data_files"), str(config.get("data_dir") or "").strip("/")
    if data_files is None:
        return {"train": [f"{folder}/{p}" for p in DATA_FILE_PATTERNS]} if folder else {}
    if isinstance(data_files, (str, list)) and all(isinstance(f, str) for f in _listed(data_files)):
        data_files = {"train": data_files}
    elif isinstance(data_files, list):
        data_files = {f.get("split", "train"): f.get("path", []) for f in data_files if isinstance(f, dict)}
    if not isinstance(data_files, dict):
        return {}
    return {str(split): [f"{folder}/{p}" if folder else p for p in _listed(paths)] for split, paths in data_files.items()}


def _listed(value) -> list:
    return [value] if isinstance(value, str) else list(value or [])


def _as_uris(uri: str, patterns: list[str]) -> str:
    return ", ".join(f"{uri.rstrip('/')}/{p}" for p in patterns) or "no files"


_SPLIT_NAME = re.compile(r"(?:^|[-._ /])(train|training|test|testing|eval|evaluation|valid|validation|dev|val)"
                         r"(?:[-._ 0-9/]|$)", re.IGNORECASE)


SPLIT_WORDS = {"train": ("train", "training"), "test": ("test", "testing", "eval", "evaluation")}


def split_files(files: list[str], split: str) -> list[str]:
    """Of a dataset's file paths, those of `split` (train or test), named as the hub's loader
    (`datasets`) finds them (`train-00000-of-00001.parquet`, `data/test.jsonl`,
    `train/part-0.json`); all of them when no file names a split."""
    named = {f: _SPLIT_NAME.findall(f) for f in files}
    if not any(named.values()):
        return files
    return [f for f, words in named.items() if any(w.lower() in SPLIT_WORDS[split] for w in words)]


_CACHED = re.compile(r"/datasets--([^/]+?)--([^/]+)/snapshots/[0-9a-f]{40}/(.+)$")


def cache_uri(path: Path | str) -> str | None:
    """hf://datasets/OWNER/NAME/FILE for a file in the hub cache's snapshot of a dataset (how to
    show it), else None."""
    found = _CACHED.search(Path(path).as_posix())
    return f"{DATASET_PREFIX}{found[1]}/{found[2]}/{found[3]}" if found else None
