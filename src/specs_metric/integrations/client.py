"""A client of ``specs serve``, and a TRL reward function that calls the service.

Needs only the standard library (and Pillow, to send PIL images): a training job can score
its completions on a shared SPECS server without loading the model itself.

Images are sent as their encoded bytes (base64): a local file is read by the bounded reader
and sent as it is, a PIL image is sent as PNG (lossless, so the server decodes the same
pixels). ``remote_paths=True`` sends paths instead, for a server started with
``--image-root`` that holds the images.

A server answering 503 (overloaded) is asked again after its ``Retry-After``, up to
``retries`` times; then :class:`~specs_metric.errors.OverloadedError` is raised, and
:class:`~specs_metric.errors.ServiceError` for any other refusal. Per-pair problems are not
errors: they come back in each result's ``error``.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Sequence

from PIL import Image

from specs_metric.errors import OverloadedError, ServiceError, UsageError
from specs_metric.integrations.rewards import (
    ReasonLog,
    RewardFunction,
)
from specs_metric.io.reading import read_image_bytes

logger = logging.getLogger(__name__)


def encode_image(image: object, remote_paths: bool = False) -> dict:
    """The request cell of one image: ``{"image_b64": ...}``, or ``{"image": path}`` with
    ``remote_paths``. A path is read here (the bounded reader); bytes are sent as they are.

    >>> encode_image(b"hi")
    {'image_b64': 'aGk='}
    >>> encode_image("a/b.png", remote_paths=True)
    {'image': 'a/b.png'}
    """
    if isinstance(image, dict) and image.get("bytes"):  # an HF {"bytes", "path"} struct
        image = image["bytes"]
    elif isinstance(image, dict):
        image = image.get("path")
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    if isinstance(image, (str, os.PathLike)):
        if remote_paths:
            return {"image": os.fspath(image)}
        image = read_image_bytes(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return {"image_b64": base64.b64encode(bytes(image)).decode("ascii")}
    raise UsageError(f"an image must be a path, bytes or a PIL image (got {type(image).__name__})")


class SPECSClient:
    """Scores pairs on a ``specs serve`` server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds to wait for one answer.
        retries: how often an overloaded server (503) is asked again.
        remote_paths: send image paths (resolved by the server under its ``--image-root``)
            instead of reading the files here.

    One client may be shared by threads: each thread keeps its own connection.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 120.0,
        retries: int = 5,
        remote_paths: bool = False,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(f"the service URL must be http(s)://host[:port], got {url!r}")
        self.url = url.rstrip("/")
        self._parsed = parsed
        self.timeout, self.retries, self.remote_paths = timeout, retries, remote_paths
        self._local = threading.local()

    # --- HTTP -------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = (
                http.client.HTTPSConnection
                if self._parsed.scheme == "https"
                else http.client.HTTPConnection
            )
            conn = cls(self._parsed.hostname, self._parsed.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _once(self, method: str, path: str, body: bytes | None) -> tuple[int, dict, dict]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (0, 1):  # a kept-alive connection the server closed: open a new one
            conn = self._connection()
            try:
                conn.request(method, self._parsed.path.rstrip("/") + path, body, headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (ConnectionError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                if attempt:
                    raise ServiceError(f"{self.url}: {exc}") from exc
            except OSError as exc:
                conn.close()
                self._local.conn = None
                raise ServiceError(f"{self.url}: {exc}") from exc
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {"error": data[:200].decode("utf-8", "replace")}
        return response.status, dict(response.getheaders()), doc

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict:
        for attempt in range(self.retries + 1):
            status, headers, doc = self._once(method, path, body)
            if status == 200:
                return doc
            if status != 503 or attempt == self.retries:
                break
            wait = headers.get("Retry-After") or headers.get("retry-after") or "1"
            time.sleep(float(wait) if wait.replace(".", "", 1).isdigit() else 1.0)
        message = doc.get("error") or doc.get("detail") or "no message"
        kind = OverloadedError if status == 503 else ServiceError
        raise kind(f"{self.url}{path}: HTTP {status}: {message}")

    # --- API --------------------------------------------------------------------------
    def health(self) -> dict:
        """The server's ``/health``: its model, settings and batching counters."""
        return self._request("GET", "/health")

    def score_pairs(self, images: Sequence[object], captions: Sequence[object]) -> list[dict]:
        """One result per pair (``score``, ``cosine``, ``tokens``, ``truncated``,
        ``warning``, ``error``), in order, from one request."""
        if len(images) != len(captions):
            raise UsageError(f"{len(images)} images but {len(captions)} captions")
        pairs = [
            {**encode_image(image, self.remote_paths), "caption": caption}
            for image, caption in zip(images, captions, strict=True)
        ]
        return self.send(pairs)

    def send(self, pairs: list[dict]) -> list[dict]:
        """``POST /score`` of request cells (``{"image_b64" or "image", "caption"}``, see
        :func:`encode_image`) -> one result per pair."""
        if not pairs:
            return []
        doc = self._request("POST", "/score", json.dumps({"pairs": pairs}).encode("utf-8"))
        return doc["results"]

    def score(self, images: Sequence[object], captions: Sequence[object]) -> list[float | None]:
        """The score of each pair (``None`` for a pair with an error)."""
        return [r["score"] for r in self.score_pairs(images, captions)]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class SPECSServiceReward(RewardFunction):
    """A TRL reward function (see :class:`~specs_metric.integrations.trl.SPECSReward`)
    whose scores come from a ``specs serve`` server.

    Args:
        url: the server, or ``client``: a :class:`SPECSClient`.
        image_column: the column of the images (name it ``image_path`` or similar for a
            text-only policy: TRL reads a column ``image`` as the policy's input).
        name: the reward's ``__name__`` (TRL logs ``rewards/<name>/mean``).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        image_column: str = "image",
        name: str = "specs",
        client: SPECSClient | None = None,
        remote_paths: bool = False,
    ) -> None:
        self.client = client or SPECSClient(url, remote_paths=remote_paths)
        self.image_column = image_column
        self.__name__ = name
        self.log_reasons = ReasonLog(logger, "SPECS service reward")

    def rewards(
        self, images: list[object], captions: list[str]
    ) -> tuple[list[float | None], list[str | None]]:
        n = len(captions)
        cells, problems = [], {}
        for i, image in enumerate(images):  # an image that cannot be sent costs its row
            try:
                cells.append(encode_image(image, self.client.remote_paths))
            except (UsageError, OSError, ValueError) as exc:
                problems[i] = f"completion {i + 1}: {exc}"
                cells.append(None)
        todo = [i for i in range(n) if i not in problems]
        results = self.client.send([{**cells[i], "caption": captions[i]} for i in todo])
        scores: list[float | None] = [None] * n
        errors: list[str | None] = [problems.get(i) for i in range(n)]
        for i, result in zip(todo, results, strict=True):
            scores[i] = result["score"]
            if result["error"] is not None:  # "pair K: ..." -> "completion i: ..."
                errors[i] = f"completion {i + 1}: {result['error'].split(': ', 1)[-1]}"
        return scores, errors
