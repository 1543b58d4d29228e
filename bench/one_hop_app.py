"""A minimal one-hop Serve app for the serving bench: one deployment whose replica owns both HTTP (FastAPI
through `@serve.ingress`) and the batched model (`@serve.batch` around the same traced Predictor), nothing else.

bench/serve_load.py --one-hop runs it on the same Ray, HTTP path and load as the shipped app and as
bench/plain_server.py. It decided the shipped graph: against the app of 2026-12-01 (HAProxy -> Ingress ->
handle call -> Detector deployment) it served 96 against 64 req/s under 16 clients, and a lone client in 35
against 51 ms, so the shipped Ingress now runs the model itself (deepfake/detector.py). Since then the gap
between the two is what the shipped app's own work costs: keys, limits, provenance, metrics, the JSON schema.

Only the hot path: POST /predict (raw body), GET /healthz, GET /model; no keys, limits, metrics or explain.
"""

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

api = FastAPI()


@serve.deployment(name="OneHop", max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class OneHop:
    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float):
        from deepfake.inference import load_scorer

        self.predictor = load_scorer(model_dir, device="cpu", jit=True)
        self.batch.set_max_batch_size(max_batch_size)
        self.batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def batch(self, images: list[Any]) -> list[dict[str, Any]]:
        # in a thread, as the plain server does: the traced forward leaves the GIL to the event loop
        return await asyncio.to_thread(self.predictor.predict_images, images)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        from deepfake.images import BadImage, decode_image

        try:  # in the event loop, as the plain server does
            image = decode_image(await request.body())
        except BadImage as e:
            return JSONResponse({"error": e.reason, "detail": e.detail}, status_code=415)
        return JSONResponse({"results": [await self.batch(image)]})

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.predictor.version})

    @api.get("/model")
    async def model(self) -> JSONResponse:
        return JSONResponse({"version": self.predictor.version, "meta": {"image_size": self.predictor.image_size}})
