"""The batched model inside a Serve replica: what answers /predict, in the process that received the request.

Why in the Ingress replica and not a deployment of its own: a handle call per image costs more than the model
on a small machine. bench/serve_load.py on 2 cores, 64 clients: with the model behind a handle the app served
85 req/s (a lone client: 44 ms), with the model here 162 req/s (30 ms), beside a hand-written one-process
server's 126-152 req/s (29 ms). The Explainer (Grad-CAM, a backward pass per image) stays a deployment of its
own, so it cannot hold up predictions.

`@serve.batch` collects concurrent requests; `ForwardMerger` joins the batches that arrive while the model is
busy; `@serve.multiplexed` keeps the named models of the models directory, least recently used dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from ray import serve

log = logging.getLogger("ray.serve")

MAX_MODELS_PER_REPLICA = 3  # named models a replica keeps loaded (least recently used go)
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


class Overloaded(Exception):
    """More images wait for the model than the replica may queue: answer 503 and let the client retry."""


def replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (unit use)
        return "local"


def dummy_images(size: int, n: int) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (i * 40 % 256, 128, 200)) for i in range(n)]


def batch_size_histogram():
    from ray.serve import metrics

    return metrics.Histogram("deepfake_batch_size", "images per forward pass", BATCH_BUCKETS)


class ForwardMerger:
    """Runs `fn` on lists of items one call at a time, merging everything submitted while a call runs
    into the next call (whole submissions, up to `max_items`; at least one).

    Why: `@serve.batch` forms a batch every `batch_wait_timeout_s` whether or not the model is free, and
    queues those batches behind the running one: under 64 clients the forward passes got 3-10 images while
    requests waited ~1 s in formed batches. Merged, each pass gets what arrived during the last one (24-32
    images here), and a lone request still waits only the batch timeout."""

    def __init__(self, fn: Callable[[list], list], max_items: int, on_pass: Callable[[int], None] | None = None):
        self.fn = fn
        self.max_items = max_items
        self.on_pass = on_pass  # told each pass's size (the batch-size histogram)
        self.pending: list[tuple[list, asyncio.Future]] = []
        self.drainer: asyncio.Task | None = None
        self.pass_sizes: Counter[int] = Counter()
        self.busy_s = 0.0  # wall time inside fn: its share of a run says whether the model is the bottleneck

    @property
    def items(self) -> int:
        return sum(n * k for n, k in self.pass_sizes.items())

    async def submit(self, items: list) -> tuple[list, int]:
        """`fn`'s results for `items`, and how many items the call that produced them had."""
        done = asyncio.get_running_loop().create_future()
        self.pending.append((items, done))
        if self.drainer is None or self.drainer.done():
            # its own task, so a cancelled request cannot stop the calls other requests wait on
            self.drainer = asyncio.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        while self.pending:
            take, n = [], 0
            while self.pending and (not take or n + len(self.pending[0][0]) <= self.max_items):
                take.append(self.pending.pop(0))
                n += len(take[-1][0])
            await self._run(take, n)

    async def _run(self, take: list[tuple[list, asyncio.Future]], n: int) -> None:
        t0 = time.perf_counter()
        try:
            # off the event loop: requests keep arriving (and merging) meanwhile
            out = await asyncio.to_thread(self.fn, [x for items, _ in take for x in items])
        except Exception as e:  # noqa: BLE001 - the callers get the error; later calls still run
            for _, done in take:
                if not done.done():
                    done.set_exception(e)
            return
        self.busy_s += time.perf_counter() - t0
        self.pass_sizes[n] += 1
        if self.on_pass is not None:
            self.on_pass(n)
        for items, done in take:
            if not done.done():
                done.set_result((out[: len(items)], n))
            out = out[len(items) :]


class NamedModels:
    """Which model a request gets: the default one (loaded at start) when it names none or the default's own
    name, else a folder of the models directory by name through the class's multiplexed `get_model`. The
    Detector and the Explainer share this rule."""

    def load_models(self, model_dir: str, models_dir: str | None, **load_kw: Any) -> None:
        from deepfake.inference import load_scorer

        self.load_kw = load_kw
        self.predictor = load_scorer(model_dir, **load_kw)
        self.default_name = Path(model_dir).name
        self.models_dir = Path(models_dir or Path(model_dir).parent)

    async def get_model(self, name: str) -> Any:
        raise NotImplementedError

    async def scorer(self, name: str = "") -> Any:
        """The default model ('') or a named one of the models directory (loaded on first use)."""
        return self.predictor if not name or name == self.default_name else await self.get_model(name)


class Detector(NamedModels):
    """The replica's models: the default one loaded at start, the named ones on first use; one verdict per
    `predict` call, concurrent calls answered by one forward pass per model."""

    def __init__(
        self,
        model_dir: str,
        device: str = "auto",
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.01,
        warmup: bool = True,
        jit: bool = True,
        threads: int | None = None,
        operating_point: str | None = None,
        models_dir: str | None = None,
        max_queued_images: int = 512,
    ):
        if threads:
            import torch

            torch.set_num_threads(threads)
        # traced: its forward leaves the GIL to the event loop that receives the next requests
        self.load_models(model_dir, models_dir, device=device, jit=jit, operating_point=operating_point)
        self.max_batch_size = max_batch_size
        self.max_queued_images = max_queued_images
        self.waiting = 0  # images admitted and not yet answered
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_hist = batch_size_histogram()
        self.merger = ForwardMerger(self.predictor.predict_images, max_batch_size, self.batch_hist.observe)
        # Serve warns when max_batch_size x max_concurrent_batches exceeds max_ongoing_requests, since the
        # batches would hold the replica; here they only wait in the merger, so the advice does not apply
        log.addFilter(lambda record: "`max_concurrent_batches`" not in record.getMessage())
        self.replica = replica_id()
        self.last_ok = 0.0
        self.started = time.monotonic()
        if warmup:  # first-call latency (allocator, kernels) is paid here, not by a client
            self.predictor.predict_images(dummy_images(self.predictor.image_size, min(max_batch_size, 4)))
            self.last_ok = time.monotonic()
        log.info("Detector %s ready: %s on %s", self.replica, self.predictor.version, self.predictor.device)

    def admit(self, n: int) -> None:
        """Refuse `n` more images when the queue is full (Overloaded), before their request decodes them."""
        if self.waiting + n > self.max_queued_images:
            raise Overloaded(f"{self.waiting} images wait for the model (limit {self.max_queued_images})")

    async def predict(self, image: Image.Image, name: str = "") -> dict[str, Any]:
        """The verdict of one image by the default model ('') or a named one of the models directory."""
        self.admit(1)
        self.waiting += 1
        try:
            return await self._batched((image, name))
        finally:
            self.waiting -= 1

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, name: str) -> Any:
        """A model folder of the models directory by name, loaded on first use with its own ForwardMerger;
        Serve drops the least recently used beyond MAX_MODELS_PER_REPLICA (the Ingress checked the name)."""
        from deepfake.inference import load_scorer

        scorer = await asyncio.to_thread(load_scorer, str(self.models_dir / name), **self.load_kw)
        scorer.merger = ForwardMerger(scorer.predict_images, self.max_batch_size, self.batch_hist.observe)
        log.info("Detector %s loaded model %s: %s", self.replica, name, scorer.version)
        return scorer

    async def _merger(self, name: str) -> ForwardMerger:
        scorer = await self.scorer(name)
        return self.merger if scorer is self.predictor else scorer.merger

    # sizes are set in __init__; batches enter at once and merge in ForwardMerger, one model's at a time
    @serve.batch(max_concurrent_batches=64)
    async def _batched(self, items: list[tuple[Image.Image, str]]) -> list[dict[str, Any]]:
        by_model: dict[str, list[int]] = {}
        for i, (_, name) in enumerate(items):
            by_model.setdefault(name, []).append(i)
        out: list[dict[str, Any] | None] = [None] * len(items)

        async def run(name: str, idx: list[int]) -> None:
            verdicts, n = await (await self._merger(name)).submit([items[i][0] for i in idx])
            for i, v in zip(idx, verdicts):
                out[i] = {**v, "batch_size": n, "replica": self.replica}

        await asyncio.gather(*(run(name, idx) for name, idx in by_model.items()))
        self.last_ok = time.monotonic()
        return out  # type: ignore[return-value]

    def stats(self) -> dict[str, Any]:
        import torch

        m = self.merger
        return {
            "replica": self.replica,
            "model": self.predictor.version,
            "device": str(self.predictor.device),
            "torch_threads": torch.get_num_threads(),
            "images": m.items,
            "batches": sum(m.pass_sizes.values()),
            "batch_sizes": {str(k): v for k, v in sorted(m.pass_sizes.items())},
            "max_batch_size": max(m.pass_sizes, default=0),
            "busy_s": round(m.busy_s, 2),
            "waiting": self.waiting,
            "uptime_s": round(time.monotonic() - self.started, 2),
        }

    def check_health(self) -> None:
        """Raise if the model no longer produces finite output (Serve then restarts the replica)."""
        if time.monotonic() - self.last_ok < 30:
            return
        import numpy as np

        answer = self.predictor.predict_images(dummy_images(self.predictor.image_size, 1))[0]
        if not np.isfinite([answer["prob_ai"], answer["prob_ai_raw"]]).all():
            raise RuntimeError("model produced non-finite output")
        self.last_ok = time.monotonic()
