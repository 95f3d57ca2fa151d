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
def dataset_snapshot(uri: str) -> tuple[Path, str | None]:
    """The local folder holding the files of a hub dataset input, and the input's pattern
    (relative to that folder, fnmatch as the hub's own; None: the train split's files). The files are downloaded into the
    hub cache once; when HF_HUB_OFFLINE is set or the hub cannot be reached, the cached snapshot
    is used. Errors name the input and the ways to run offline (exit 2)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, revision, pattern = parse_dataset_uri(uri)
    try:
        folder = snapshot_download(repo, repo_type="dataset", revision=revision,
                                   allow_patterns=[pattern] if pattern else DATA_FILE_PATTERNS)
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
    return Path(folder), pattern


_SPLIT_NAME = re.compile(r"(?:^|[-._ /])(train|training|test|testing|eval|evaluation|valid|validation|dev|val)"
                         r"(?:[-._ 0-9/]|$)", re.IGNORECASE)


def train_split_files(files: list[str]) -> list[str]:
    """Of a dataset's file paths, the train split's, named as the hub's loader (`datasets`) finds
    them (`train-00000-of-00001.parquet`, `data/train.jsonl`, `train/part-0.json`); all of them
    when no file names a split."""
    named = {f: _SPLIT_NAME.findall(f) for f in files}
    if not any(named.values()):
        return files
    return [f for f, words in named.items() if any(w.lower() in ("train", "training") for w in words)]


_CACHED = re.compile(r"/datasets--([^/]+?)--([^/]+)/snapshots/[0-9a-f]{40}/(.+)$")


def cache_uri(path: Path | str) -> str | None:
    """hf://datasets/OWNER/NAME/FILE for a file in the hub cache's snapshot of a dataset (how to
    show it), else None."""
    found = _CACHED.search(Path(path).as_posix())
    return f"{DATASET_PREFIX}{found[1]}/{found[2]}/{found[3]}" if found else None
