"""A hub model id (model.name: owner/name), resolved to the commit a run uses, before any phase
loads it.

Asked once per run, when the fingerprints are computed: the hub's current commit of the
repo's main branch when the hub answers; the cached commit when HF_HUB_OFFLINE is set or the
hub cannot be reached (a warning says so). A repo that is unknown, gated or private, or that
is neither reachable nor cached, is an InputError (exit 2) at once, naming model.name and the
ways to run offline, instead of a library's retries ending in an OSError.
"""

from __future__ import annotations

import functools
import logging

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
