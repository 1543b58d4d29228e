"""The server a user could write by hand instead of Ray Serve: one process, uvicorn + Starlette, and an
asyncio micro-batcher around the same traced model. bench/serve_load.py runs it beside the Serve app, on the
same model and the same load, for the ratios issue 19 asks for.

    .venv/bin/python bench/plain_server.py --model models/cifake-b0 --port 8100

POST /predict (the image as the raw body) answers {"results": [{"label", "prob_ai", ...}]} as the app does;
GET /healthz answers "ok". No auth, limits, metrics, explanations or model swaps: only the hot path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("plain_server")


class MicroBatcher:
    """Requests wait at most `wait_s` for others to join them; a batch of up to `max_batch` runs in a thread,
    so the event loop keeps accepting while the model runs."""

    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch: int = 32, wait_s: float = 0.01):
        self.fn, self.max_batch, self.wait_s = fn, max_batch, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()

    async def submit(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((item, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self.queue.get(), left))
                    except TimeoutError:
                        break
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - every waiter gets the error
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            for (_, fut), res in zip(batch, results):
                fut.set_result(res)


def build_app(model: str, max_batch: int = 32, wait_s: float = 0.01, threads: int | None = None):
    """The Starlette app: decode in the handler, batch the forward pass."""
    import torch
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from deepfake.images import BadImage, decode_image
    from deepfake.inference import Predictor

    if threads:
        torch.set_num_threads(threads)
    predictor = Predictor.from_dir(model, device="auto", jit=True)  # the same traced model the Detector runs
    batcher = MicroBatcher(predictor.predict_images, max_batch, wait_s)

    async def predict(request: Request) -> JSONResponse:
        try:
            image = decode_image(await request.body())
        except BadImage as e:
            return JSONResponse({"error": str(e)}, status_code=415)
        return JSONResponse({"results": [await batcher.submit(image)]})

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    return Starlette(
        routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz)], lifespan=lifespan
    )


def main() -> int:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "cifake-b0"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--wait", type=float, default=0.01, help="seconds a request waits for others to join")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(args.model, args.max_batch, args.wait, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
