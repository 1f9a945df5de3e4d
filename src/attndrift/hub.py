"""Is a Hugging Face hub model or dataset usable here, decided in seconds?

Validation asks before anything is recorded: offline (``HF_HUB_OFFLINE=1``) only the cache is
looked at; online, one HEAD request to the hub with a short timeout and no retries (the hub
libraries retry a dead network for about a minute). Used by `attndrift.models.clip` and
`attndrift.data.hf`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def probe_timeout() -> float:
    """Seconds the one hub probe waits: HF_HUB_ETAG_TIMEOUT (huggingface_hub's own knob for
    this metadata request) when set, else 5."""
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 5)
    except ValueError:
        return 5.0


def offline(repo_type: str = "model") -> bool:
    """HF_HUB_OFFLINE (or, for datasets, HF_DATASETS_OFFLINE) forbids downloads."""
    from huggingface_hub import is_offline_mode

    if repo_type == "dataset" and os.environ.get("HF_DATASETS_OFFLINE") is not None:
        return os.environ["HF_DATASETS_OFFLINE"].strip().upper() in ("1", "ON", "YES", "TRUE")
    return is_offline_mode()


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.lru_cache(maxsize=64)
def probe(repo_id: str, repo_type: str = "model",
          filename: str = "config.json") -> tuple[str, str] | None:
    """One HEAD of ``filename`` of ``repo_id`` on the hub: no retries, `probe_timeout` seconds.
    None when the hub answered that it has the repo; else (kind, why) with kind one of
    ``unreachable``, ``missing``, ``gated``."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type),
                             timeout=probe_timeout(), retry_on_errors=False)
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: test it first
        return "gated", "gated"
    except RepositoryNotFoundError:
        return "missing", "not found"
    except EntryNotFoundError:  # the repo is there without that file: the loader decides
        return None
    except HfHubHTTPError as err:  # the hub answered (5xx, ...): the loader says more
        return None if err.response is not None else ("unreachable", type(err).__name__)
    except Exception as err:  # connection refused, DNS, timeout, proxy: the hub is not there
        return "unreachable", type(err).__name__
    return None
