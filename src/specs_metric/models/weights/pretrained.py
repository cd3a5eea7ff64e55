"""Named checkpoints: where they live, how they are fetched and verified.

Hub files are downloaded with ``huggingface_hub`` into its cache (``HF_HOME``) and work
offline once cached (a cached file is used without asking the Hub). HF ``transformers``
models (a registry entry with ``layout="hf"``, or ``hf:org/repo[@revision]``) resolve to the
snapshot folder holding ``config.json``, the weights and ``preprocessor_config.json``. Files
that are not on the Hub (OpenAI CLIP) come from a pinned URL and are verified against the
sha256 in that URL; they are cached under ``$SPECS_CACHE`` (default
``~/.cache/specs_metric``). Demo models ship inside the package.

Before a download the server is asked once, with a short timeout
(``SPECS_NETWORK_TIMEOUT``, default 5 s), whether it answers at all; without a network
the command fails at once with one line instead of retrying.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from specs_metric.errors import CheckpointError, ModelNotAvailableError
from specs_metric.io.reading import check_file, open_regular
from specs_metric.io.writing import atomic_write


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
    # The architecture (a name in specs_metric.models.archs.ARCHS) an OpenAI-layout file is read
    # with; HF folders describe themselves and are checked against it.
    arch: str = "openai"
    layout: str = "openai"  # "openai": one state-dict file; "hf": a transformers folder
    revision: str | None = None

    @property
    def source(self) -> str:
        if self.package_file:
            return f"bundled with the package ({self.package_file})"
        if self.layout == "hf":
            return f"hf:{self.hf_repo}" + (f"@{self.revision}" if self.revision else "")
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
            arch="ViT-B-32-quickgelu",
            url=f"{_OPENAI}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
            sha256="40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
        ),
        PretrainedModel(
            "clip-b16",
            "OpenAI CLIP ViT-B/16 (77 tokens)",
            arch="ViT-B-16-quickgelu",
            url=f"{_OPENAI}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
            sha256="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        ),
        PretrainedModel(
            "clip-l14",
            "OpenAI CLIP ViT-L/14 (77 tokens)",
            arch="ViT-L-14-quickgelu",
            url=f"{_OPENAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
            sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        ),
        PretrainedModel(
            "clip-b32-hf",
            "OpenAI CLIP ViT-B/32, HF transformers format (77 tokens)",
            hf_repo="openai/clip-vit-base-patch32",
            arch="ViT-B-32-quickgelu",
            layout="hf",
        ),
        PretrainedModel(
            "clip-b16-hf",
            "OpenAI CLIP ViT-B/16, HF transformers format (77 tokens)",
            hf_repo="openai/clip-vit-base-patch16",
            arch="ViT-B-16-quickgelu",
            layout="hf",
        ),
        PretrainedModel(
            "clip-l14-hf",
            "OpenAI CLIP ViT-L/14, HF transformers format (77 tokens)",
            hf_repo="openai/clip-vit-large-patch14",
            arch="ViT-L-14-quickgelu",
            layout="hf",
        ),
        PretrainedModel(
            "longclip-gmp-l14",
            "LongCLIP-GmP ViT-L/14 (zer0int's fine-tune of LongCLIP-L), HF format, 248 tokens",
            hf_repo="zer0int/LongCLIP-GmP-ViT-L-14",
            arch="openai",
            layout="hf",
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



def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open_regular(path, what="checkpoint file", error=CheckpointError) as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Cache folder for files not hosted on the Hub."""
    return Path(os.environ.get("SPECS_CACHE", Path.home() / ".cache" / "specs_metric"))


def _unavailable(
    entry: PretrainedModel, reason: str, filename: str | None = None
) -> ModelNotAvailableError:
    if entry.layout == "hf":
        return ModelNotAvailableError(
            f"model '{entry.name}' needs {filename} from hf://{entry.hf_repo}, which is not in "
            f"the hub cache and could not be downloaded ({reason}). Connect to the internet "
            "once to cache it, or pass a local save_pretrained folder: --model DIR"
        )
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
    try:
        digest = hashlib.sha256()
        with atomic_write(target, "wb") as out, urllib.request.urlopen(
            entry.url, timeout=30
        ) as src:
            while block := src.read(1 << 20):
                digest.update(block)
                out.write(block)
            if digest.hexdigest() != entry.sha256:  # raised inside: the file never appears
                raise ModelNotAvailableError(
                    f"downloaded {entry.url} has sha256 {digest.hexdigest()}, "
                    f"expected {entry.sha256}"
                )
    except OSError as exc:
        raise _unavailable(entry, str(exc)) from exc
    return target


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except (ImportError, AttributeError):
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hub_file(entry: PretrainedModel, filename: str) -> Path:
    """One file of the entry's Hub repo: from the hub cache without any network request, or
    downloaded after one quick probe (no retries, the client's retry lines silenced).

    Raises:
        ModelNotAvailableError: offline mode, an unreachable Hub, or a failed download.
    """
    assert entry.hf_repo
    from huggingface_hub import hf_hub_download

    revision = entry.revision
    try:  # a cached file needs no network at all
        return Path(
            hf_hub_download(entry.hf_repo, filename, revision=revision, local_files_only=True)
        )
    except Exception:  # not cached (the client's error types vary between versions)
        pass
    if _offline():
        raise _unavailable(entry, "offline mode is set", filename)
    url = f"{_hub_endpoint()}/{entry.hf_repo}/resolve/{revision or 'main'}/{filename}"
    reason = probe(url)
    if reason is not None:
        raise _unavailable(entry, reason, filename)
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry lines would bury our one-line error
    try:
        return Path(hf_hub_download(entry.hf_repo, filename, revision=revision))
    except Exception as exc:  # the Hub client raises many types for "offline / unreachable"
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        raise _unavailable(entry, reason, filename) from exc
    finally:
        hub_logger.setLevel(level)


def _download_hub(entry: PretrainedModel) -> Path:
    assert entry.filename
    return _hub_file(entry, entry.filename)


HF_PREFIX = "hf:"
HF_CONFIG_FILES = ("config.json", "preprocessor_config.json", "open_clip_config.json")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_entry(spec: str) -> PretrainedModel:
    """The entry of an ``hf:org/repo[@revision]`` model (an HF ``transformers`` folder)."""
    repo, _, revision = spec[len(HF_PREFIX) :].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise FileNotFoundError(f"'{spec}': expected hf:ORG/REPO or hf:ORG/REPO@REVISION")
    return PretrainedModel(
        spec, f"HF model {repo}", hf_repo=repo, layout="hf", revision=revision or None
    )


def _download_hub_folder(entry: PretrainedModel) -> Path:
    """Fetch (or find in the hub cache) an HF model's config, preprocessing and weights;
    returns their snapshot folder."""
    folder = _hub_file(entry, "config.json").parent
    for optional in HF_CONFIG_FILES[1:]:
        with contextlib.suppress(ModelNotAvailableError):  # absent files are fine
            _hub_file(entry, optional)
    candidates = (entry.filename,) if entry.filename else HF_WEIGHT_FILES
    for weights in candidates[:-1]:
        with contextlib.suppress(ModelNotAvailableError):  # try the next candidate
            _hub_file(entry, weights)
            return folder
    _hub_file(entry, candidates[-1])
    return folder


def is_cached(entry: PretrainedModel) -> bool:
    """Whether a named model's files are available without a download."""
    if entry.package_file:
        return True
    if entry.url and entry.sha256:
        return (cache_dir() / entry.sha256 / Path(entry.url).name).is_file()
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        found = try_to_load_from_cache(entry.hf_repo, filename, revision=entry.revision)
        return isinstance(found, str)

    if entry.layout == "hf":
        names = (entry.filename,) if entry.filename else HF_WEIGHT_FILES
        return cached("config.json") and any(cached(n) for n in names)
    return bool(entry.filename) and cached(entry.filename)


def lookup(name_or_path: str | os.PathLike[str]) -> PretrainedModel | None:
    """The registry entry of a name or an ``hf:`` spec; ``None`` for a path."""
    key = str(name_or_path)
    if key.startswith(HF_PREFIX):
        return hub_entry(key)
    return REGISTRY.get(key)


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a registry name, an ``hf:`` spec or a path into a local checkpoint file, or an
    HF ``transformers`` folder.

    Raises:
        ModelNotAvailableError: a named model that cannot be fetched.
        FileNotFoundError: neither a known name nor an existing file or model folder.
    """
    key = str(name_or_path)
    entry = lookup(key)
    if entry is None:
        path = Path(os.path.expanduser(key))  # (Path.expanduser raises for an unknown ~user)
        if path.is_file() or (path / "config.json").is_file():
            return path
        if path.is_dir():
            raise FileNotFoundError(
                f"'{key}' is a folder without config.json; pass a checkpoint file or an HF "
                "save_pretrained folder"
            )
        if path.exists():  # a FIFO, a device or a socket: refused unopened, with its kind
            check_file(path, what="checkpoint file", error=CheckpointError)
        raise FileNotFoundError(
            f"'{key}' is neither a model name ({', '.join(REGISTRY)}), hf:ORG/REPO, an "
            "existing file nor a model folder"
        )
    if entry.layout == "hf":
        return _download_hub_folder(entry)
    if entry.package_file:
        path = Path(str(resources.files("specs_metric").joinpath("assets", entry.package_file)))
        if not path.is_file():
            raise ModelNotAvailableError(f"bundled file {path} is missing from the installation")
        return path
    if entry.hf_repo:
        return _download_hub(entry)
    return _download_url(entry)
