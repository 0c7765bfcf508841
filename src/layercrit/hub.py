"""Pretrained weights from the network: are they cached, does their source answer, and what to do when neither.

Offline, huggingface_hub retries every file it cannot find for about a minute before giving up. Here one short
probe (or ``HF_HUB_OFFLINE=1``) decides first: cached files are then read from the cache alone, and missing ones
are a one-line :class:`~layercrit.errors.LayercritError` naming what to download and where to put it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import LayercritError

PROBE_TIMEOUT_S = 3.0
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm reads the first of these a repo has
_probed: dict[str, bool] = {}  # host -> answered; probed once per process


@dataclass(frozen=True)
class Download:
    """Files one model needs from the network: where they come from, whether they are here, how to put them here."""

    url: str
    cached: bool
    fix: str
    from_hub: bool  # the Hugging Face Hub, where HF_HUB_OFFLINE applies


def hf_download(repo: str, filenames: Sequence[Sequence[str]], *, arch_hint: str | None = None) -> Download:
    """Files of Hugging Face repo ``repo`` (``ORG/NAME[@REVISION]``); each entry of ``filenames`` lists alternatives,
    of which one must be cached (e.g. ``["config.json"], HF_WEIGHT_FILES``)."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    cached = all(
        any(isinstance(try_to_load_from_cache(repo_id, name, cache_dir=hf_cache(), revision=revision or None), str)
            for name in alternatives)
        for alternatives in filenames
    )
    folder = "models--" + repo_id.replace("/", "--")
    fix = (f"on a machine that is online run `hf download {repo_id}` and copy its {folder} folder into {hf_cache()}"
           + (f", or pass the weights file as --model FILE --arch {arch_hint}" if arch_hint else ""))
    return Download(url=f"{hf_endpoint()}/{repo_id}", cached=cached, fix=fix, from_hub=True)


def url_download(url: str, *, arch_hint: str | None = None) -> Download:
    """A file that torch hub keeps in its ``checkpoints`` folder under the URL's file name."""
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name
    fix = f"download {url} to {path}" + (f", or pass it as --model FILE --arch {arch_hint}" if arch_hint else "")
    return Download(url=url, cached=path.is_file(), fix=fix, from_hub=False)


@contextlib.contextmanager
def access(what: str, download: Download) -> Iterator[None]:
    """Run the code that fetches ``download`` inside this: online when its source answers; from the cache alone,
    at once, when it does not and the files are cached; otherwise raise the one-line error."""
    offline = hub_offline() and download.from_hub
    if offline:
        reason = "HF_HUB_OFFLINE is set"
    elif not reachable(download.url):
        reason = f"{urlsplit(download.url).hostname} does not answer (offline?)"
    else:
        yield
        return
    if not download.cached:
        instant = "" if offline else "; with HF_HUB_OFFLINE=1 layercrit does not try the network at all"
        raise LayercritError(f"cannot download {what}: {reason}; {download.fix}{instant}")
    with _hub_offline_mode():
        yield


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the host of ``url`` answers one HEAD request within ``timeout`` (name lookup included); any HTTP
    status counts as an answer. Remembered per host for the rest of the process."""
    parts = urlsplit(url)
    host = f"{parts.scheme}://{parts.netloc}"
    if host not in _probed:
        answered: list[bool] = []

        def probe() -> None:
            try:
                urllib.request.urlopen(urllib.request.Request(host, method="HEAD"), timeout=timeout).close()
                answered.append(True)
            except urllib.error.HTTPError:
                answered.append(True)
            except (OSError, ValueError):
                answered.append(False)

        thread = threading.Thread(target=probe, daemon=True)  # a hanging DNS lookup ignores socket timeouts
        thread.start()
        thread.join(timeout)
        _probed[host] = bool(answered and answered[0])
    return _probed[host]


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub sees it (it reads the variable once, at import)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _hub_offline_mode() -> Iterator[None]:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def hf_cache() -> str:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
