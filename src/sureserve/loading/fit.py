"""``sureserve fit``: where a model fits, from its config alone, in the field's order.

    one device at the preferred precision (fastest)
    → split across GPUs at that precision, balanced, nothing on the CPU
    → 8-bit, then 4-bit, on one device (each needs ``sureserve quantize`` to accept it)
    → CPU/disk offload, only when allowed, with a loud warning and a cost estimate
    → refuse, with the numbers

``plan_fit`` is pure (sizes and a ``Machine`` in, a plan out), so every branch is tested
with simulated machines; ``model_size`` counts parameters on the meta device (accelerate:
no weights are read or allocated), so a 70B model can be planned on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
#: bytes per parameter of each precision (int4: two weights a byte, plus group scales)
PRECISION_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5625}
#: what we assume besides weights and KV cache: activations and allocator slack as a share
#: of the weights, and a fixed runtime cost per GPU (CUDA context, cuBLAS workspaces)
ACTIVATION_SHARE = 0.10
GPU_RUNTIME_GIB = 1.0
#: host-to-GPU copy speed assumed for offloaded layers (PCIe 4.0 x16, in practice)
PCIE_GBPS = 25.0


@dataclass(frozen=True)
class Machine:
    gpus: tuple[float, ...] = ()  # free GiB of each GPU
    cpu_gib: float = 16.0  # free host memory

    @property
    def kind(self) -> str:
        return "gpu" if self.gpus else "cpu"


@dataclass(frozen=True)
class ModelSize:
    params: int
    largest_block: int  # parameters of the largest module that must stay on one device
    kv_bytes_per_token: int  # at 2 bytes per value (0 for encoders)


@dataclass
class FitPlan:
    placement: str  # single | split | quantize | offload | refuse
    precision: str | None
    devices: list[str]
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    max_memory: dict[str, float] | None = None  # GiB per device, for from_pretrained

    def to_dict(self) -> dict[str, Any]:
        return {"placement": self.placement, "precision": self.precision,
                "devices": self.devices, "reasons": self.reasons, "warnings": self.warnings,
                "max_memory_gib": self.max_memory}


def need_gib(size: ModelSize, precision: str, kv_mb: float, packed_mb: float = 0.0,
             panel_mb: float = 0.0) -> tuple[float, float, float]:
    """(weights GiB, KV budget GiB, total GiB with activations) at ``precision``;
    ``packed_mb``: the bound on oneDNN's packed copies of float32/bfloat16 linear weights
    (``packed_linear_mb``, CPU only): at most the weights again; ``panel_mb``: the bound on
    the decode kernel's panel copies of float32 weights (``decode_panels_mb``, CPU
    generation only): at most the weights again."""
    weights = size.params * PRECISION_BYTES[precision] / GIB
    kv = kv_mb / 1024 if size.kv_bytes_per_token else 0.0
    packed = min(packed_mb / 1024, weights) if precision in ("float32", "bfloat16") else 0.0
    panels = min(panel_mb / 1024, weights) if precision == "float32" else 0.0
    return weights, kv, weights * (1 + ACTIVATION_SHARE) + kv + packed + panels


def precisions(machine: Machine) -> list[str]:
    """Full precision first: float32 on a CPU, bfloat16 on GPUs; then 8-bit and 4-bit."""
    return ["float32" if machine.kind == "cpu" else "bfloat16", "int8", "int4"]


def plan_fit(size: ModelSize, machine: Machine, kv_mb: float,
             allow_offload: bool = False, packed_mb: float = 0.0, panel_mb: float = 0.0
             ) -> tuple[list[dict[str, Any]], FitPlan]:
    """``packed_mb``: the packed_linear_mb bound when packed_linear is on; ``panel_mb``:
    the decode_panels_mb bound for a generation model whose decode kernel is on (both
    counted on a CPU only: a GPU packs nothing)."""
    order = precisions(machine)
    packed_mb = 0.0 if machine.gpus else packed_mb
    panel_mb = 0.0 if machine.gpus else panel_mb
    one = max(machine.gpus) - GPU_RUNTIME_GIB if machine.gpus else machine.cpu_gib
    where = "GPU" if machine.gpus else "CPU"
    rows = []
    for p in ["float32", "bfloat16", "int8", "int4"]:
        w, kv, total = need_gib(size, p, kv_mb, packed_mb, panel_mb)
        rows.append({"precision": p, "weights_gib": round(w, 2),
                     "kv_bytes_per_token": int(size.kv_bytes_per_token * (2 if p == "float32"
                                                                          else 1)),
                     "kv_gib": round(kv, 2), "needs_gib": round(total, 2),
                     "fits_one_device": total <= one})
    best = order[0]
    _, _, need = need_gib(size, best, kv_mb, packed_mb, panel_mb)
    assumed = (f"needs = weights x {1 + ACTIVATION_SHARE:g} (activations) + KV budget "
               f"{kv_mb:g} MB" + (f"; {GPU_RUNTIME_GIB:g} GiB per GPU kept for the runtime"
                                    if machine.gpus else "")
               + (f" + packed copies of 16/32-bit linear weights (up to packed_linear_mb, "
                  f"{packed_mb:g} MB)" if packed_mb else "")
               + (f" + the decode kernel's panel copies of float32 weights (up to "
                  f"decode_panels_mb, {panel_mb:g} MB)" if panel_mb else ""))
    first = "cuda:0" if machine.gpus else "cpu"
    if need <= one:
        return rows, FitPlan("single", best, [first], [
            f"{best} needs {need:.1f} GiB and one {where} has {one:.1f} GiB: one device is "
            "fastest", assumed])
    if len(machine.gpus) > 1:
        usable = [g - GPU_RUNTIME_GIB for g in machine.gpus]
        block = size.largest_block * PRECISION_BYTES[best] / GIB
        if need <= sum(usable) and block <= min(usable):
            n = next((k for k in range(2, len(usable) + 1)
                      if need <= sum(sorted(usable, reverse=True)[:k])), len(usable))
            gpus = sorted(range(len(usable)), key=lambda i: -usable[i])[:n]
            per = {f"cuda:{i}": round(min(usable[i], need / n * 1.1), 2) for i in gpus}
            return rows, FitPlan("split", best, sorted(per), [
                f"{best} needs {need:.1f} GiB: more than one GPU ({one:.1f} GiB), less than "
                f"{n} together ({sum(usable[i] for i in gpus):.1f} GiB); a balanced split "
                f"(~{need / n:.1f} GiB each, no layer on the CPU)", assumed], max_memory=per)
    short = "the GPUs hold" if machine.gpus else "the CPU has"
    for q in ("int8", "int4"):
        _, _, qneed = need_gib(size, q, kv_mb, packed_mb, panel_mb)
        if qneed <= one:
            return rows, FitPlan("quantize", q, [first], [
                f"{best} needs {need:.1f} GiB, more than {short}; {q} needs {qneed:.1f} GiB "
                f"and fits one {where} ({one:.1f} GiB)",
                assumed], [f"{q} needs `sureserve quantize MODEL --eval FILE` to accept it on "
                           "your data before serving"])
    total_mem = sum(g - GPU_RUNTIME_GIB for g in machine.gpus) + machine.cpu_gib
    w, _, _ = need_gib(size, best, kv_mb, packed_mb, panel_mb)
    if allow_offload and machine.gpus and need <= total_mem:
        offloaded = max(0.0, need - sum(g - GPU_RUNTIME_GIB for g in machine.gpus))
        per_token_s = offloaded * GIB / (PCIE_GBPS * 1e9)
        return rows, FitPlan("offload", best, [*(f"cuda:{i}" for i in range(len(machine.gpus))),
                                                "cpu"], [
            f"{best} needs {need:.1f} GiB; the GPUs hold "
            f"{sum(machine.gpus) - GPU_RUNTIME_GIB * len(machine.gpus):.1f}: {offloaded:.1f} "
            "GiB of layers go to the CPU (--allow-offload)", assumed], [
            f"OFFLOAD: {offloaded:.1f} GiB of layers run from CPU memory and are copied to the "
            f"GPU every step: about {per_token_s:.2f} s per generated token (<= "
            f"{1 / max(per_token_s, 1e-9):.1f} tokens/s at {PCIE_GBPS:g} GB/s); a single layer "
            "on the CPU becomes the bottleneck. Quantizing or more GPU memory is far faster"])
    if allow_offload and not machine.gpus:
        return rows, FitPlan("offload", best, ["cpu", "disk"], [
            f"{best} needs {need:.1f} GiB and the CPU has {machine.cpu_gib:.1f}: the rest is "
            "read from disk (--allow-offload)", assumed], [
            "OFFLOAD to disk: every step reads the offloaded layers from disk; expect well "
            "under 1 token/s"])
    smallest = need_gib(size, "int4", kv_mb, packed_mb, panel_mb)[2]
    return rows, FitPlan("refuse", None, [], [
        f"{best} needs {need:.1f} GiB (weights {w:.1f}); even int4 needs {smallest:.1f} GiB and "
        f"one {where} has {one:.1f} GiB" + (
            f", all GPUs together {sum(machine.gpus) - GPU_RUNTIME_GIB * len(machine.gpus):.1f}"
            if machine.gpus else ""), assumed],
        ["does not fit: add GPU memory, lower --kv-cache-mb, or pass --allow-offload to "
         "run slowly from CPU memory"])


def model_size(folder: Path, config: dict[str, Any], task: str,
               trust_remote_code: bool = False) -> ModelSize:
    """Parameters counted on the meta device from the config alone: no weights read."""
    import transformers
    from accelerate import init_empty_weights

    from sureserve.loading.inspect import AUTO_CLASSES, kv_bytes_per_token

    cfg = transformers.AutoConfig.from_pretrained(str(folder),
                                                  trust_remote_code=trust_remote_code)
    cls = getattr(transformers, AUTO_CLASSES[task])
    with init_empty_weights():
        model = cls.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    # on the meta device the output embeddings are not tied to the input ones: when the
    # config ties them they are one matrix, counted once
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(cfg, "tie_word_embeddings", False) and out_emb is not None \
            and out_emb.weight is not model.get_input_embeddings().weight:
        params -= out_emb.weight.numel()
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [sum(p.numel() for p in m.parameters()) for m in model.modules()
              if type(m).__name__ in no_split]
    kv = kv_bytes_per_token(config, "bfloat16") if task == "generate" else None
    return ModelSize(int(params), int(max(blocks, default=0)), int(kv or 0))


def real_machine() -> Machine:
    import psutil
    import torch

    gpus: tuple[float, ...] = ()
    if torch.cuda.is_available():
        gpus = tuple(torch.cuda.mem_get_info(i)[0] / GIB
                     for i in range(torch.cuda.device_count()))
    return Machine(gpus, psutil.virtual_memory().available / GIB)


def off_device(device_map: dict[str, Any] | None, device: str = "cuda") -> list[str]:
    """Modules that ``from_pretrained`` placed on the CPU or disk (from ``hf_device_map``)
    when the model was meant for a GPU ``device``; nothing for a model planned on the CPU."""
    if not device.startswith("cuda"):
        return []
    return [name or "(whole model)" for name, where in (device_map or {}).items()
            if str(where) in ("cpu", "disk")]


def fit_model(identifier: str, settings: Any, *, task: str | None = None,
              revision: str | None = None, gpus: int | None = None,
              gpu_memory: float | None = None, cpu_memory: float | None = None,
              allow_offload: bool = False) -> dict[str, Any]:
    """The ``fit`` report for a model id or a folder holding only ``config.json``."""
    from sureserve.loading.inspect import infer_task, read_json
    from sureserve.loading.source import resolve

    source = resolve(identifier, revision, settings)
    config = read_json(source.path / "config.json")
    task = infer_task(source.path, config, task)
    size = model_size(source.path, config, task, settings.trust_remote_code)
    real = real_machine()
    simulated = gpus is not None or gpu_memory is not None or cpu_memory is not None
    n = gpus if gpus is not None else (len(real.gpus) if gpu_memory is None else 1)
    per = [gpu_memory if gpu_memory is not None else 80.0] * n if simulated else list(real.gpus)
    machine = Machine(tuple(per), cpu_memory if cpu_memory is not None else real.cpu_gib)
    panels = task == "generate" and settings.direct_decode and settings.decode_kernel
    rows, plan = plan_fit(size, machine, settings.kv_cache_mb, allow_offload,
                          settings.packed_linear_mb if settings.packed_linear else 0.0,
                          settings.decode_panels_mb if panels else 0.0)
    return {"model": identifier, "task": task, "params": size.params,
            "largest_block_params": size.largest_block,
            "kv_cache_mb": settings.kv_cache_mb if size.kv_bytes_per_token else None,
            "machine": {"gpus_gib": [round(g, 1) for g in machine.gpus],
                        "cpu_gib": round(machine.cpu_gib, 1), "simulated": simulated},
            "precisions": rows, "plan": plan.to_dict()}


def print_fit(rep: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    m = rep["machine"]
    console.print(f"{rep['model']} ({rep['task']}): {rep['params'] / 1e9:.2f}B parameters; "
                  f"machine: {len(m['gpus_gib'])} GPU(s) {m['gpus_gib']} GiB free, CPU "
                  f"{m['cpu_gib']} GiB" + (" (simulated)" if m["simulated"] else ""))
    t = Table("precision", "weights GiB", "KV bytes/token", "KV GiB", "needs GiB",
              "fits one device")
    for r in rep["precisions"]:
        t.add_row(r["precision"], str(r["weights_gib"]), str(r["kv_bytes_per_token"]),
                  str(r["kv_gib"]), str(r["needs_gib"]), "yes" if r["fits_one_device"] else "no")
    console.print(t)
    p = rep["plan"]
    console.print(f"plan: [bold]{p['placement']}[/] {p['precision'] or ''} on "
                  f"{', '.join(p['devices']) or 'nothing'}")
    for r in p["reasons"]:
        console.print(f"  {r}", highlight=False)
    for w in p["warnings"]:
        console.print(f"  [yellow]warning:[/] {w}", highlight=False)
