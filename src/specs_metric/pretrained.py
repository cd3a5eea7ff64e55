"""Named checkpoints: where they live, how they are fetched and verified.

Hub files are downloaded with ``huggingface_hub`` into its cache (``HF_HOME``) and work
offline once cached (a cached file is used without asking the Hub). Files that are not on
the Hub (OpenAI CLIP) come from a pinned URL and are verified against the sha256 in that
URL; they are cached under ``$SPECS_CACHE`` (default ``~/.cache/specs_metric``). Demo
models ship inside the package.

Before a download the server is asked once, with a short timeout
(``SPECS_NETWORK_TIMEOUT``, default 5 s), whether it answers at all; without a network
the command fails at once with one line instead of retrying.
"""

from __future__ import annotations

import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from specs_metric.checkpoint import file_sha256


@dataclass(frozen=True)
class PretrainedModel:
    """Where one named checkpoint comes from."""

    name: str
    description: str
    hf_repo: str | None = None
    filename: str | None = None
    url: str | None = None
    sha256: str | None = None
    package_file: str | None = None  # a file under specs_metric/assets

    @property
    def source(self) -> str:
        if self.package_file:
            return f"bundled with the package ({self.package_file})"
        if self.hf_repo:
            return f"hf://{self.hf_repo}/{self.filename}"
        return str(self.url)


_OPENAI = "https://openaipublic.azureedge.net/clip/models"

REGISTRY: dict[str, PretrainedModel] = {
    m.name: m
    for m in [
        PretrainedModel(
            "specs-b32",
            "SPECS (LongCLIP ViT-B/32 fine-tuned for specificity); the released model",
            hf_repo="Xiaohud/SPECS",
            filename="spec.pt",
        ),
        PretrainedModel(
            "longclip-b32",
            "LongCLIP ViT-B/32 trained from OpenAI CLIP B/32 (SPECS's initialisation)",
            hf_repo="Xiaohud/SPECS",
            filename="openai_b32_longclip.pt",
        ),
        PretrainedModel(
            "longclip-b16",
            "LongCLIP-B (ViT-B/16)",
            hf_repo="BeichenZhang/LongCLIP-B",
            filename="longclip-B.pt",
        ),
        PretrainedModel(
            "longclip-l14",
            "LongCLIP-L (ViT-L/14)",
            hf_repo="BeichenZhang/LongCLIP-L",
            filename="longclip-L.pt",
        ),
        PretrainedModel(
            "clip-b32",
            "OpenAI CLIP ViT-B/32 (77 tokens)",
            url=f"{_OPENAI}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
            sha256="40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
        ),
        PretrainedModel(
            "clip-b16",
            "OpenAI CLIP ViT-B/16 (77 tokens)",
            url=f"{_OPENAI}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
            sha256="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        ),
        PretrainedModel(
            "clip-l14",
            "OpenAI CLIP ViT-L/14 (77 tokens)",
            url=f"{_OPENAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
            sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        ),
        PretrainedModel(
            "specs-synth-demo",
            "DEMO of the synthetic world only: tiny SPECS model trained on generated scenes",
            package_file="specs-synth-demo.safetensors",
        ),
        PretrainedModel(
            "clip-synth-demo",
            "DEMO of the synthetic world only: the contrastive-only twin of specs-synth-demo",
            package_file="clip-synth-demo.safetensors",
        ),
    ]
}


class ModelNotAvailableError(RuntimeError):
    """A named checkpoint is neither cached nor downloadable (e.g. offline)."""


def cache_dir() -> Path:
    """Cache folder for files not hosted on the Hub."""
    return Path(os.environ.get("SPECS_CACHE", Path.home() / ".cache" / "specs_metric"))


def _unavailable(entry: PretrainedModel, reason: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"model '{entry.name}' needs the file {entry.source}, which is not in the local cache "
        f"and could not be downloaded ({reason}). Connect to the internet once to cache it, "
        f"or download the file yourself and pass its path: --model /path/to/"
        f"{entry.filename or Path(str(entry.url)).name}"
    )


def network_timeout() -> float:
    """Seconds to wait for a server's first answer (``SPECS_NETWORK_TIMEOUT``, default 5)."""
    return float(os.environ.get("SPECS_NETWORK_TIMEOUT", "5"))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("SPECS_OFFLINE")


def probe(url: str, timeout: float | None = None) -> str | None:
    """Ask ``url``'s server for a HEAD answer within ``timeout``; None if it answered (with
    any HTTP status), else why not (refused, unresolvable, no answer in time)."""
    timeout = network_timeout() if timeout is None else timeout
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered
    except urllib.error.URLError as exc:
        return f"{url} is unreachable: {exc.reason}"
    except TimeoutError:
        return f"{url} did not answer within {timeout:g} s"
    except (OSError, http.client.HTTPException) as exc:
        return f"{url} is unreachable: {type(exc).__name__}: {exc}"


def _download_url(entry: PretrainedModel) -> Path:
    assert entry.url and entry.sha256
    target = cache_dir() / entry.sha256 / Path(entry.url).name
    if target.is_file() and file_sha256(target) == entry.sha256:
        return target
    if _offline():
        raise _unavailable(entry, "offline mode is set")
    reason = probe(entry.url)
    if reason is not None:
        raise _unavailable(entry, reason)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry.url, timeout=30) as src:
            while block := src.read(1 << 20):
                out.write(block)
        digest = file_sha256(tmp)
        if digest != entry.sha256:
            raise ModelNotAvailableError(
                f"downloaded {entry.url} has sha256 {digest}, expected {entry.sha256}"
            )
        os.replace(tmp, target)
    except OSError as exc:
        raise _unavailable(entry, str(exc)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except (ImportError, AttributeError):
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _download_hub(entry: PretrainedModel) -> Path:
    assert entry.hf_repo and entry.filename
    from huggingface_hub import hf_hub_download

    try:  # a cached file needs no network at all
        return Path(hf_hub_download(entry.hf_repo, entry.filename, local_files_only=True))
    except Exception:  # not cached (the client's error types vary between versions)
        pass
    if _offline():
        raise _unavailable(entry, "offline mode is set")
    reason = probe(f"{_hub_endpoint()}/{entry.hf_repo}/resolve/main/{entry.filename}")
    if reason is not None:
        raise _unavailable(entry, reason)
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry lines would bury our one-line error
    try:
        return Path(hf_hub_download(entry.hf_repo, entry.filename))
    except Exception as exc:  # the Hub client raises many types for "offline / unreachable"
        raise _unavailable(
            entry, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    finally:
        hub_logger.setLevel(level)


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a registry name or a path into a local checkpoint file.

    Raises:
        ModelNotAvailableError: a named model that cannot be fetched.
        FileNotFoundError: neither a known name nor an existing file.
    """
    key = str(name_or_path)
    entry = REGISTRY.get(key)
    if entry is None:
        path = Path(key).expanduser()
        if path.is_file():
            return path
        raise FileNotFoundError(
            f"'{key}' is neither a model name ({', '.join(REGISTRY)}) nor an existing file"
        )
    if entry.package_file:
        path = Path(str(resources.files("specs_metric").joinpath("assets", entry.package_file)))
        if not path.is_file():
            raise ModelNotAvailableError(f"bundled file {path} is missing from the installation")
        return path
    if entry.hf_repo:
        return _download_hub(entry)
    return _download_url(entry)
