"""The baseline for ``sureserve bench serve``: a plain FastAPI endpoint that runs a
``transformers`` pipeline once per request, the way most first deployments look.

Run as ``python -m sureserve.bench.plain_server MODEL_DIR PORT``.
"""

from __future__ import annotations

import sys

import numpy as np
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline


class Body(BaseModel):
    inputs: str


def make_app(model_dir: str) -> FastAPI:
    pipe = pipeline("feature-extraction", model=model_dir, device="cpu",
                    tokenize_kwargs={"truncation": True, "max_length": 256})
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/embed")
    def embed(body: Body) -> list[list[float]]:  # sync: FastAPI runs it in its threadpool
        tokens = np.asarray(pipe(body.inputs)[0], dtype=np.float32)
        v = tokens.mean(axis=0)
        return [(v / np.linalg.norm(v)).tolist()]

    return app


if __name__ == "__main__":
    uvicorn.run(make_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]),
                log_level="warning")
