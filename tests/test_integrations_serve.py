"""`specs serve` over real HTTP on localhost: scores equal `specs score`'s for several
concurrent clients (requests merged into batches), bad rows are per-row errors with
`specs score`'s messages, paths stay inside --image-root, an overloaded server answers 503
with Retry-After at once; the client and its TRL reward adapter."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from integration_helpers import CAPTIONS, DEMO, EXAMPLE_IMAGES, reference_scores
from specs_metric.data.images import resolve_image_cell
from specs_metric.errors import DataError, ServiceError
from specs_metric.integrations.client import SPECSClient, SPECSServiceReward
from specs_metric.integrations.pairs import PairScorer
from specs_metric.integrations.trl import SPECSReward
from specs_metric.scoring.scorer import load
from subprocesses import child_env, free_port

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOL = 1e-6


def _suffix(message: str) -> str:
    """An error message without its row's label (``line 3: `` / ``pair 3: ``)."""
    return message.split(": ", 1)[1]


@pytest.fixture(scope="module")
def images_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    (root / "scenes").mkdir()
    for path in EXAMPLE_IMAGES:
        shutil.copy(path, root / "scenes")
    (root / "broken.png").write_bytes(b"not an image")
    (root.parent / "secret.png").write_bytes(open(EXAMPLE_IMAGES[0], "rb").read())
    return root


@pytest.fixture(scope="module")
def server(images_root):
    """`specs serve` in a child process on a free port."""
    command = [sys.executable, "-m", "specs_metric", "serve", "--model", DEMO, "--port", "0",
               "--device", "cpu", "--image-root", str(images_root), "--max-batch-pairs", "32",
               "--max-wait-ms", "30"]  # fmt: skip
    proc = subprocess.Popen(command, env=child_env(), stderr=subprocess.PIPE, text=True)
    url, lines = None, []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            url = match.group(1)
            break
    if url is None:
        proc.kill()
        pytest.fail("specs serve did not start:\n" + "".join(lines))
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_concurrent_clients_get_specs_score_scores(server, images_root, tmp_path):
    client = SPECSClient(server)
    before = client.health()
    assert before["status"] == "ok" and before["model"] == DEMO and before["accepts_paths"]
    n_clients, per_request = 8, 3
    jobs = []
    for c in range(n_clients):
        idx = [(c + k) % len(EXAMPLE_IMAGES) for k in range(per_request)]
        caps = [CAPTIONS[(c * 2 + k) % len(CAPTIONS)] for k in range(per_request)]
        jobs.append((idx, caps))
    barrier = threading.Barrier(n_clients)
    answers: dict[int, list] = {}

    def one(c: int) -> None:
        idx, caps = jobs[c]
        kind = c % 3  # local files sent as bytes, PIL images, paths under --image-root
        if kind == 0:
            images = [EXAMPLE_IMAGES[i] for i in idx]
            mine = client
        elif kind == 1:
            images = [Image.open(EXAMPLE_IMAGES[i]) for i in idx]
            mine = client
        else:
            images = [f"scenes/{EXAMPLE_IMAGES[i].rsplit('/', 1)[1]}" for i in idx]
            mine = SPECSClient(server, remote_paths=True)
        barrier.wait()
        for _ in range(3):
            answers.setdefault(c, []).append(mine.score_pairs(images, caps))

    threads = [threading.Thread(target=one, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    all_images = [EXAMPLE_IMAGES[i] for idx, _ in jobs for i in idx]
    all_captions = [c for _, caps in jobs for c in caps]
    rows = reference_scores(tmp_path, all_images, all_captions)
    for c in range(n_clients):
        assert len(answers[c]) == 3
        for results in answers[c]:
            for k, result in enumerate(results):
                row = rows[c * per_request + k]
                assert result["error"] is None
                assert result["score"] == pytest.approx(row["score"], abs=TOL)
                assert result["cosine"] == pytest.approx(row["cosine"], abs=TOL)
                assert result["tokens"] == row["tokens"]
    after = client.health()
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 3 * n_clients
    assert batches < requests  # concurrent requests were merged
    assert after["largest_batch"] > per_request


def test_bad_rows_are_per_row_errors_with_specs_score_messages(server, images_root, tmp_path):
    good = open(EXAMPLE_IMAGES[1], "rb").read()
    pairs = [
        {"image": "scenes/scene1.png", "caption": CAPTIONS[0]},
        {"image": "../secret.png", "caption": CAPTIONS[1]},  # leaves the image root
        {"image": "scenes/missing.png", "caption": CAPTIONS[1]},
        {"image": "broken.png", "caption": CAPTIONS[1]},
        {"image": "scenes/scene2.png", "caption": ""},
        {"image": "scenes/scene2.png", "caption": 7},
        {"image_b64": base64.b64encode(good).decode(), "caption": CAPTIONS[2]},
        {"image_b64": "%%% not base64", "caption": CAPTIONS[2]},
        {"image_b64": base64.b64encode(b"junk").decode(), "caption": CAPTIONS[2]},
        "not an object",
    ]
    results = SPECSClient(server).send(pairs)
    assert len(results) == len(pairs)
    # The path rows but the escaping one through `specs score --image-root ROOT`
    path_rows = [0, 2, 3, 4, 5]
    rows = reference_scores(
        tmp_path, [pairs[k]["image"] for k in path_rows], [pairs[k]["caption"] for k in path_rows],
        "--image-root", str(images_root),
    )  # fmt: skip
    for k, row in zip(path_rows, rows, strict=True):
        result = results[k]
        if row["error"] is None:
            assert result["error"] is None
            assert result["score"] == pytest.approx(row["score"], abs=TOL)
        else:
            assert result["score"] is None
            assert result["error"] == f"pair {k + 1}: {_suffix(row['error'])}"
    assert sum(r["error"] is not None for r in rows) == 4
    # the escaping path: the image-cell resolver's refusal (confine=True)
    with pytest.raises(DataError) as refused:
        resolve_image_cell("../secret.png", images_root, confine=True)
    assert results[1]["score"] is None and results[1]["error"] == f"pair 2: {refused.value}"
    # The byte rows through `specs score` of a parquet table of image bytes
    byte_rows = reference_scores(tmp_path, [good, b"junk"], [CAPTIONS[2], CAPTIONS[2]])
    assert results[6]["score"] == pytest.approx(byte_rows[0]["score"], abs=TOL)
    assert results[8]["score"] is None
    # `specs score` names the row "<file>: row N: ..."; the message after it is the same
    assert results[8]["error"].startswith("pair 9: ")
    assert byte_rows[1]["error"].endswith(": " + _suffix(results[8]["error"]))
    assert results[7]["error"] == "pair 8: image_b64 is not valid base64"
    assert results[9]["error"].startswith("pair 10: a pair must be a JSON object")


def _post(url: str, body: bytes, timeout: float = 30):
    request = urllib.request.Request(url + "/score", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_malformed_requests(server):
    status, _, doc = _post(server, b"{not json")
    assert status == 400 and doc["error"].startswith("the body is not JSON")
    status, _, doc = _post(server, b'{"captions": []}')
    assert status == 400
    status, _, doc = _post(server, json.dumps({"pairs": [{}] * 1025}).encode())
    assert status == 413 and "at most 1024" in doc["error"]
    status, _, doc = _post(server, b'{"pairs": []}')
    assert status == 200 and doc["results"] == []


class GatedPairs(PairScorer):
    """A pair scorer that waits for ``gate`` before scoring (to hold the model busy)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def score(self, images, captions, labels=None):
        self.entered.set()
        assert self.gate.wait(30)
        return super().score(images, captions, labels)


@pytest.fixture
def gated_server():
    """build_app in this process (uvicorn in a thread): no image root, a queue of 4 pairs."""
    import uvicorn

    from specs_metric.integrations.serve import ServeOptions, build_app

    pairs = GatedPairs(load(DEMO, device="cpu"), accept_paths=False)
    options = ServeOptions(max_batch_pairs=4, max_queue_pairs=4, max_wait_ms=0)
    port = free_port()
    config = uvicorn.Config(build_app(pairs, options), host="127.0.0.1", port=port,
                            log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield url, pairs
    pairs.gate.set()
    server.should_exit = True
    thread.join(30)


def test_overload_is_refused_at_once_with_retry_after(gated_server):
    url, pairs = gated_server
    image = base64.b64encode(open(EXAMPLE_IMAGES[0], "rb").read()).decode()
    body = json.dumps({"pairs": [{"image_b64": image, "caption": CAPTIONS[0]}] * 3}).encode()
    first: dict = {}
    holder = threading.Thread(target=lambda: first.update(answer=_post(url, body)))
    holder.start()
    assert pairs.entered.wait(10)  # 3 of 4 pairs admitted, the model busy
    started = time.perf_counter()
    status, headers, doc = _post(url, body, timeout=5)
    assert status == 503 and time.perf_counter() - started < 2
    assert headers["retry-after"] == "1" and doc["error"].startswith("overloaded")
    with pytest.raises(ServiceError, match="HTTP 503"):
        SPECSClient(url, retries=0).score([EXAMPLE_IMAGES[0]] * 2, ["a", "b"])
    # a client that retries gets its answer once the server has room again
    retried: dict = {}
    retrier = threading.Thread(target=lambda: retried.update(
        scores=SPECSClient(url, retries=5).score([EXAMPLE_IMAGES[0]] * 2, CAPTIONS[:2])))
    retrier.start()
    time.sleep(0.3)
    pairs.gate.set()
    holder.join(30)
    retrier.join(30)
    assert first["answer"][0] == 200
    expected = load(DEMO, device="cpu").score([EXAMPLE_IMAGES[0]] * 2, CAPTIONS[:2])
    assert retried["scores"] == pytest.approx(expected.tolist(), abs=TOL)
    health = SPECSClient(url).health()
    assert health["rejected"] >= 2 and health["admitted_pairs"] == 0
    # without --image-root, paths are per-row errors
    results = SPECSClient(url, remote_paths=True).score_pairs(["scenes/scene1.png"], ["a"])
    assert results[0]["error"] == (
        "pair 1: image paths are not accepted here; send the image's bytes"
    )


def test_service_reward_equals_the_local_reward(server):
    local = SPECSReward(load(DEMO, device="cpu"), image_column="image_path")
    remote = SPECSServiceReward(server, image_column="image_path")
    completions = [[{"role": "assistant", "content": c}] for c in CAPTIONS[:4]] + [[{
        "role": "assistant", "content": ""}]]  # fmt: skip
    images = EXAMPLE_IMAGES[:4] + [EXAMPLE_IMAGES[0]]
    expected = local(completions=completions, image_path=images)
    got = remote(prompts=["p"] * 5, completions=completions, image_path=images)
    assert got[:4] == pytest.approx(expected[:4], abs=TOL)
    assert got[4] is None and expected[4] is None
    assert remote.__name__ == "specs"


def test_batcher_merges_splits_and_refuses():
    """The batcher alone: concurrent requests share a batch, each gets its own results back,
    a lone request is not held back by max_wait_ms, a full queue refuses at once."""
    import asyncio

    from specs_metric.errors import OverloadedError
    from specs_metric.integrations.batcher import DynamicBatcher

    calls = []

    def score(images, captions, labels):
        calls.append(list(images))
        time.sleep(0.05)  # the model's time, in the worker thread
        return [f"{i}:{c}" for i, c in zip(images, captions, strict=True)]

    async def scenario():
        batcher = DynamicBatcher(score, max_batch_pairs=8, max_queue_pairs=10, max_wait_ms=200)
        batcher.start()
        started = time.perf_counter()
        alone = await batcher.submit(["x"], ["a"], ["pair 1"])
        lone_wait = time.perf_counter() - started
        first = asyncio.ensure_future(batcher.submit([0, 1], ["a", "b"], ["p1", "p2"]))
        await asyncio.sleep(0.01)  # the first batch is being scored: the others queue up
        rest = [asyncio.ensure_future(batcher.submit([k], [str(k)], ["p"])) for k in (2, 3, 4)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError, match="overloaded"):
            await batcher.submit(list(range(6)), ["c"] * 6, ["p"] * 6)  # 5 + 6 > 10
        answers = await asyncio.gather(first, *rest)
        await batcher.stop()
        return alone, lone_wait, answers, batcher.stats.as_dict()

    alone, lone_wait, answers, stats = asyncio.run(scenario())
    assert alone == ["x:a"] and lone_wait < 0.15  # no 200 ms wait for a lone client
    assert answers == [["0:a", "1:b"], ["2:2"], ["3:3"], ["4:4"]]
    assert calls == [["x"], [0, 1], [2, 3, 4]]  # the three queued requests in one batch
    assert stats["batches"] == 3 and stats["rejected"] == 1 and stats["pairs"] == 6
