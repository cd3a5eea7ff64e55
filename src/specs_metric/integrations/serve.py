"""``specs serve``: an HTTP service that scores (image, caption) pairs for many clients.

One process loads the model once and serves it with FastAPI on uvicorn; concurrent
requests are merged into batches by :class:`~specs_metric.integrations.batcher.
DynamicBatcher` and scored in one worker thread by a
:class:`~specs_metric.integrations.pairs.PairScorer`, with ``specs score``'s row checks and
messages. Endpoints:

``POST /score``
    ``{"pairs": [{"image_b64": "<base64 of the encoded image>", "caption": "..."}, ...]}``
    (or ``{"image": "relative/path.png", ...}`` when the server was started with
    ``--image-root``: paths are resolved inside that folder and may not leave it).
    Answers 200 ``{"model", "scale", "results": [{"score", "cosine", "tokens",
    "truncated", "warning", "error"}, ...]}``, one result per pair in order; a pair that
    cannot be scored has ``score: null`` and its error (``pair N: ...``), and costs no
    other pair. 400: a body that is not such a document; 413: a body over the byte limit
    or more pairs than the queue holds; 503 with ``Retry-After``: the server is full
    (answered at once).
``GET /health``
    ``{"status": "ok", "model", "device", "scale", ...}`` and the batcher's counters
    (requests, pairs, batches, ``mean_pairs_per_batch``, rejected, admitted pairs).

Why FastAPI with an asyncio batcher rather than a model server (Ray Serve, LitServe): one
model on one device needs one process, and the batcher is what decides throughput and the
behaviour under overload; here it is short, bounded in pairs and tested. The two others
were measured slower on a small CPU machine, one with seconds of start-up and 65 more
packages, the other with no bounded queue (``docs/integrations/serve.md``).
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations, which
# name classes of the optional fastapi package imported inside build_app.
import base64
import binascii
import contextlib
import json
from dataclasses import dataclass

from specs_metric.errors import DataError, OverloadedError
from specs_metric.integrations import require
from specs_metric.integrations.batcher import DynamicBatcher
from specs_metric.integrations.pairs import RESULT_FIELDS, PairScorer
from specs_metric.limits import MAX_REQUEST_BYTES


@dataclass(frozen=True)
class ServeOptions:
    """How ``specs serve`` batches and admits requests."""

    max_batch_pairs: int = 64
    max_queue_pairs: int = 1024
    max_wait_ms: float = 5.0
    max_request_bytes: int = MAX_REQUEST_BYTES
    retry_after_s: int = 1


def parse_pairs(body: bytes) -> tuple[list, list, dict[int, str]]:
    """``(images, captions, problems)`` of a ``POST /score`` body: ``problems`` maps the
    index of a pair that cannot be read (not an object, undecodable base64) to why. Other
    cells stay as they are, for the pair scorer to report (``caption is not a string``...).

    >>> parse_pairs(b'{"pairs": [{"image_b64": "aGk=", "caption": "a"}, {"image_b64": "*"}]}')
    ([b'hi', None], ['a', None], {1: 'image_b64 is not valid base64'})

    Raises:
        DataError: not JSON, or not ``{"pairs": [...]}`` (answered 400).
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise DataError(f"the body is not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("pairs"), list):
        raise DataError('expected a JSON object {"pairs": [{"image_b64", "caption"}, ...]}')
    images: list = []
    captions: list = []
    problems: dict[int, str] = {}
    for i, pair in enumerate(doc["pairs"]):
        image = caption = None
        if not isinstance(pair, dict):
            problems[i] = 'a pair must be a JSON object {"image_b64", "caption"}'
        else:
            caption = pair.get("caption")
            image = pair.get("image")
            if "image_b64" in pair:
                image = pair["image_b64"]
                if isinstance(image, str):
                    try:
                        image = base64.b64decode(image, validate=True)
                    except (binascii.Error, ValueError):
                        image = None
                        problems[i] = "image_b64 is not valid base64"
        images.append(image)
        captions.append(caption)
    return images, captions, problems


def build_app(pairs: PairScorer, options: ServeOptions | None = None, model_name: str = ""):
    """The FastAPI application serving ``pairs`` (see the module docstring)."""
    fastapi = require("fastapi", "serve", "specs serve")
    from fastapi.responses import JSONResponse

    options = options or ServeOptions()
    scorer = pairs.scorer

    def score(images: list, captions: list, labels: list) -> list[dict]:
        return pairs.score(images, captions, labels).records

    batcher = DynamicBatcher(
        score,
        max_batch_pairs=options.max_batch_pairs,
        max_queue_pairs=options.max_queue_pairs,
        max_wait_ms=options.max_wait_ms,
        retry_after_s=options.retry_after_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()  # in the server's event loop
        yield
        await batcher.stop()

    app = fastapi.FastAPI(title="specs serve", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def read_body(request) -> bytes | None:
        """The body, or ``None`` when it is over the limit (read no further)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > options.max_request_bytes:
                return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > options.max_request_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_name or scorer.name,
            "device": str(scorer.device),
            "precision": scorer.precision,
            "scale": pairs.scale,
            "accepts_paths": pairs.accept_paths,
            "max_batch_pairs": options.max_batch_pairs,
            "max_queue_pairs": options.max_queue_pairs,
            "admitted_pairs": batcher.admitted,
            **batcher.stats.as_dict(),
        }

    @app.post("/score")
    async def score_pairs(request: fastapi.Request):
        body = await read_body(request)
        if body is None:
            return error(413, f"the body is over {options.max_request_bytes} bytes")
        try:
            images, captions, problems = parse_pairs(body)
        except DataError as exc:
            return error(400, str(exc))
        if len(images) > options.max_queue_pairs:
            return error(413, f"{len(images)} pairs in one request; this server takes at most "
                              f"{options.max_queue_pairs}")  # fmt: skip
        todo = [i for i in range(len(images)) if i not in problems]
        try:
            scored = await batcher.submit(
                [images[i] for i in todo], [captions[i] for i in todo],
                [f"pair {i + 1}" for i in todo],
            ) if todo else []  # fmt: skip
        except OverloadedError as exc:
            return error(503, str(exc), {"Retry-After": str(options.retry_after_s)})
        results = [dict.fromkeys(RESULT_FIELDS) for _ in images]
        for i, message in problems.items():
            results[i]["error"] = f"pair {i + 1}: {message}"
        for i, record in zip(todo, scored, strict=True):
            results[i] = record
        return {"model": model_name or scorer.name, "scale": pairs.scale, "results": results}

    return app


def serve(
    pairs: PairScorer,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServeOptions | None = None,
    model_name: str = "",
    on_ready=None,
) -> None:
    """Run the service until interrupted (uvicorn, one process, one event loop).

    ``on_ready(host, port)`` is called once the socket listens (``port`` 0 picks a free
    port, which ``on_ready`` receives).
    """
    uvicorn = require("uvicorn", "serve", "specs serve")
    app = build_app(pairs, options, model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if on_ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            if server.started:
                bound = server.servers[0].sockets[0].getsockname()
                on_ready(bound[0], bound[1])

        server.startup = startup  # type: ignore[method-assign]
    server.run()
