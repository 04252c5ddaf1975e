"""``sureserve quantize``: measure every candidate on the user's own texts, keep the ones
that hold, choose the fastest.

    eval file → split: calibration slice (sensitivity search only) | eval split (verdicts)
    baseline  fp32, measured on the eval split: outputs, speed, weights, peak memory
    candidate loaded through the same path as serving (so the gate runs on it too);
              measured the same way; fidelity below the threshold and the method can keep
              single layers in full precision → sensitivity search on the calibration slice
    verdict   accepted / rejected (fidelity, gate, or not faster here) / skipped (cannot run)
    output    the chosen recipe + the base weights + the report: a folder ``load`` takes
    vectors   (embed, when asked) shorter sizes and output precisions of the full-precision
              vectors, measured on the eval split: recall@10 against full size, verdicts
              and int8 ranges written into the folder (``vectors.py``)
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sureserve.errors import InputError
from sureserve.loading import precision as Q
from sureserve.quantize import measure as M
from sureserve.quantize.evalset import label_indices, read_eval, split
from sureserve.quantize.runner import GEN_PROMPTS, Runner
from sureserve.quantize.search import sensitivity_search
from sureserve.settings import Settings

__all__ = ["quantize", "read_eval", "write_folder"]

log = logging.getLogger("sureserve.quantize")
#: a candidate measured below this share of the required speed on the calibration slice
#: is rejected without the full measurement
HOPELESS = 0.25



@dataclass
class Candidate:
    method: str
    status: str = "skipped"  # accepted | rejected | skipped
    reason: str = ""
    speedup: float | None = None
    speedup_one: float | None = None  # decoders: one prompt alone
    weights_mib: float | None = None
    peak_rss_mib: float | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    full_precision_layers: list[str] = field(default_factory=list)
    search: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        f = self.fidelity
        return {"method": self.method, "status": self.status, "reason": self.reason,
                "speedup": _r(self.speedup), "speedup_one_prompt": _r(self.speedup_one),
                "weights_mib": _r(self.weights_mib),
                "peak_rss_mib": _r(self.peak_rss_mib),
                "min_cosine": _r(f.get("min_cosine"), 5), "p1_cosine": _r(f.get("p1_cosine"), 5),
                "mean_cosine": _r(f.get("mean_cosine"), 5),
                "neighbour_overlap": _r(f.get("neighbour_overlap")),
                "agreement": _r(f.get("agreement"), 4),
                "max_probability_diff": _r(f.get("max_probability_diff"), 4),
                "accuracy": _r(f.get("accuracy"), 4), "accuracy_drop": _r(f.get("accuracy_drop")),
                "greedy_agreement": _r(f.get("greedy_agreement")),
                "first_divergence": f.get("first_divergence"),
                "perplexity": _r(f.get("perplexity")),
                "perplexity_increase": _r(f.get("perplexity_increase"), 4),
                "full_precision_layers": list(self.full_precision_layers),
                "search": self.search}


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def quantize(model: str, texts: list[str], labels: list[str] | None = None, *,
             methods: Sequence[str] | None = None,
             thresholds: M.Thresholds | None = None, output: Path | None = None,
             settings: Settings | None = None,
             say: Callable[[str], None] = log.info,
             dimensions: Sequence[int] = (), precisions: Sequence[str] = (),
             min_recall: float = 0.9) -> dict[str, Any]:
    """Measure candidates of ``model`` on ``texts``; the report (see ``--json``).
    ``dimensions``/``precisions``: also measure shorter and smaller output vectors (embed
    models), accepted when their recall@10 against full size is at least ``min_recall``."""
    from sureserve.api import _load_and_gate as load_and_gate
    from sureserve.api import load
    from sureserve.loading.plan import detect_caps

    thresholds = thresholds or M.Thresholds()
    base_settings = (settings or Settings()).model_copy(
        update={"dtype": "float32", "quantization": None, "attn_implementation": None})
    say(f"loading the full-precision baseline of {model}")
    baseline = load(model, settings=base_settings)
    task = baseline.task_name
    if task not in Q.ALL:  # a reranker's eval needs (query, text) pairs, not a text file
        raise InputError(f"sureserve quantize does not measure {task} models yet",
                         "quantize an embedding, classification or generation model")
    if baseline.loaded.quantization is not None:
        raise InputError(f"{model} is already quantized ({baseline.loaded.quantization.method})",
                         "quantize its base model instead")
    if (dimensions or precisions) and task != "embed":
        raise InputError("--dimensions and --precisions measure embedding vectors",
                         f"drop them for this {task} model")
    base_failures = {c.name for c in baseline.gate_report.failures} \
        if baseline.gate_report else set()
    calib_idx, eval_idx = split(len(texts), task)
    gold: list[int] | None = None
    calib_gold: list[int] | None = None
    if labels is not None:
        if task != "classify":
            raise InputError("--label-field applies to classification models only",
                             "drop --label-field")
        gold_all = label_indices(labels, baseline.text_task().labels)  # type: ignore[attr-defined]
        gold = [gold_all[i] for i in eval_idx]
        calib_gold = [gold_all[i] for i in calib_idx]
    runner = Runner(task, [texts[i] for i in eval_idx])
    calib = Runner(task, [texts[i] for i in calib_idx])
    say(f"measuring the baseline on {len(eval_idx)} eval texts "
        f"({len(calib_idx)} more are the calibration slice)")
    base = runner.measure(baseline)
    calib_ref, calib_rate = calib.probe(baseline)
    base_fid = runner.fidelity(base.outputs, base.outputs, gold)
    report: dict[str, Any] = {
        "model": model, "task": task, "device": baseline.loaded.plan.device,
        "eval_texts": len(eval_idx), "calibration_texts": len(calib_idx),
        "thresholds": thresholds.__dict__,
        "baseline": {"precision": "float32", "per_second": round(base.per_second, 2),
                     "one_prompt_per_second": None if base.single_per_second is None
                     else round(base.single_per_second, 2),
                     "unit": "generated tokens/s" if task == "generate" else "texts/s",
                     "weights_mib": round(base.weights_mib, 1),
                     "peak_rss_mib": round(base.peak_rss_mib, 1),
                     "accuracy": base_fid.get("accuracy"),
                     "perplexity": base_fid.get("baseline_perplexity")},
        "candidates": [], "chosen": None, "output": None,
        "vectors": None}
    vec_results = _measure_vectors(baseline, base.outputs, calib_ref, dimensions, precisions,
                                   min_recall, say) if dimensions or precisions else None
    if vec_results is not None:
        report["vectors"] = {"min_recall": min_recall,
                             "dimensions": [m.to_dict() for m in vec_results[0]],
                             "precisions": [m.to_dict() for m in vec_results[1]]}
    caps = detect_caps()
    names = list(methods) if methods is not None else [n for n, m in Q.METHODS.items()
                                                       if task in m.tasks]
    results: list[Candidate] = []
    best: tuple[Candidate, Any] | None = None  # the fastest accepted, and its engine
    for name in names:
        method = Q.get(name)
        cand = Candidate(name)
        results.append(cand)
        why = Q.unavailable(method, task, baseline.loaded.plan.device, caps)
        if why:
            cand.reason = why
            say(f"{name}: skipped ({why})")
            continue
        slow = _hopeless_dtype(method, baseline.loaded.plan.device, base_settings)
        if slow:
            cand.status, cand.reason = "rejected", slow
            say(f"{name}: rejected ({slow})")
            continue
        ranges = None
        if method.calibrated:
            if len(calib_idx) < Q.MIN_CALIBRATION:
                why = (f"{name} measures activation ranges on the calibration slice, which "
                       f"has {len(calib_idx)} texts here; it needs at least "
                       f"{Q.MIN_CALIBRATION} (a quarter of the eval file is the slice: give "
                       f"at least {4 * Q.MIN_CALIBRATION} texts)")
                if methods is not None:  # asked for by name: refused, not skipped
                    raise InputError(why, f"give an eval file of at least "
                                          f"{4 * Q.MIN_CALIBRATION} texts")
                cand.reason = why
                say(f"{name}: skipped ({why})")
                continue
            ranges = _calibrate(baseline, calib)
        say(f"{name}: loading and measuring")
        engine, gate = load_and_gate(model, None, None, None, base_settings.model_copy(
            update={"dtype": None}), Q.Recipe(name, evaluated=True, base=model,
                                              calibration=ranges))
        new_failures = [c for c in gate.failures if c.name not in base_failures]
        if new_failures:  # what already failed on the baseline is not the method's doing
            cand.status = "rejected"
            cand.reason = "the gate fails on it: " + "; ".join(
                f"{c.name}: {c.evidence}" for c in new_failures)
            say(f"{name}: rejected, {cand.reason}")
            continue
        probe, rate = calib.probe(engine)
        probe_speed = rate / calib_rate
        if probe_speed < HOPELESS * thresholds.min_speedup:
            # far too slow to ever pass: say so from the calibration slice instead of
            # spending minutes on the eval split (weight-only int8 ran encoders at 0.03x)
            cand.status, cand.speedup = "rejected", probe_speed
            cand.fidelity = calib.fidelity(calib_ref, probe, calib_gold)
            cand.reason = (f"{probe_speed:.2f}x the full-precision speed on the calibration "
                           f"slice (needs {thresholds.min_speedup:g}x): not measured further; "
                           "fidelity shown is the calibration slice's")
            say(f"{name}: rejected, {cand.reason}")
            continue
        got = runner.measure(engine)
        cand.fidelity = runner.fidelity(base.outputs, got.outputs, gold)
        miss = M.verdict(task, cand.fidelity, thresholds)
        if miss and method.swaps_layers:
            say(f"{name}: {miss} with every layer quantized; searching for the layers to keep")
            keep, cand.search = sensitivity_search(
                engine, baseline.model, calib, calib_ref, method, task, thresholds,
                calib_gold)
            if keep is not None:
                cand.full_precision_layers = keep
                got = runner.measure(engine)
                cand.fidelity = runner.fidelity(base.outputs, got.outputs, gold)
                miss = M.verdict(task, cand.fidelity, thresholds)
                if miss:
                    miss += f" (with {len(keep)} layers in full precision)"
            else:
                miss += "; no set of layers kept in full precision holds the threshold"
        cand.speedup = got.per_second / base.per_second
        if got.single_per_second and base.single_per_second:
            cand.speedup_one = got.single_per_second / base.single_per_second
        cand.weights_mib, cand.peak_rss_mib = got.weights_mib, got.peak_rss_mib
        # a decoder counts as faster when it is at either load: one request alone (where
        # weight-only kernels gain) or the batch of prompts together
        speed = max(cand.speedup, cand.speedup_one or 0.0)
        where = "" if cand.speedup_one is None else (
            f" ({cand.speedup:.2f}x with {GEN_PROMPTS} prompts together, "
            f"{cand.speedup_one:.2f}x for one prompt alone)")
        if miss:
            cand.status, cand.reason = "rejected", miss
        elif speed < thresholds.min_speedup:
            cand.status = "rejected"
            cand.reason = (f"{speed:.2f}x the full-precision speed on this machine{where} "
                           f"(needs {thresholds.min_speedup:g}x); it would save "
                           f"{base.weights_mib - got.weights_mib:.0f} MiB of weights (see "
                           "`sureserve fit` for whether that is needed; --min-speedup accepts "
                           "slower candidates)")
        else:
            cand.status, cand.reason = "accepted", f"holds the thresholds and is faster{where}"
            if best is None or speed > max(best[0].speedup or 0, best[0].speedup_one or 0):
                best = (cand, engine)
        if name == "int8-smooth":
            from sureserve.loading.kernels import int8_pairs_saturate

            if int8_pairs_saturate():  # what ran, said where the figures are read
                cand.reason += ("; 7-bit weights: this CPU's int8 matmul saturates with 8 "
                                "(measured; no VNNI)")
        say(f"{name}: {cand.status}, {cand.reason}; speedup {cand.speedup:.2f}x")
    report["candidates"] = [c.to_dict() for c in results]
    if best is not None:
        report["chosen"] = best[0].method
    if output is not None and (best is not None or vec_results is not None):
        from sureserve import vectors

        if best is not None:
            write_folder(best[1], best[0], model, report, output)
        else:  # only the vectors were measured: the base folder and what was measured
            _copy_base(baseline.loaded.source.path, output)
            (output / Q.REPORT_FILE).write_text(
                json.dumps(report | {"output": str(output)}, indent=1) + "\n",
                encoding="utf-8")
        if vec_results is not None:
            vectors.write(output, *vec_results, len(eval_idx))
        report["output"] = str(output)
    return report


def _measure_vectors(baseline: Any, rows: Any, calib_rows: Any, dimensions: Sequence[int],
                     precisions: Sequence[str], min_recall: float,
                     say: Callable[[str], None]) -> tuple[list[Any], list[Any], Any]:
    """Shorter and smaller forms of the vectors the model serves (post-processed as it
    serves them), against full-size fp32 on the eval split; int8 ranges from the
    calibration slice."""
    from sureserve import vectors

    task = baseline.text_task()
    full, calib = task.postprocess(rows), task.postprocess(calib_rows)
    dims = vectors.measure_dimensions(full, list(dimensions), min_recall)
    precs, ranges = vectors.measure_precisions(full, calib, list(precisions), min_recall)
    for m in [*dims, *precs]:
        say(f"vectors {m.name}: {m.status} ({m.reason})")
    return dims, precs, ranges if precisions else None


def _calibrate(baseline: Any, calib: Runner) -> dict[str, Any]:
    """Every linear layer's largest absolute input per channel on the calibration slice,
    measured on the full-precision baseline as it serves (``kernels.calibrate``)."""
    from sureserve.loading import kernels

    names = Q.linear_layers(baseline.model)
    return kernels.calibrate(baseline.model, names, lambda: calib.outputs(baseline))


def _copy_base(src: Path, out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise InputError(f"the output folder {out} is not empty", "choose a new folder")
    shutil.copytree(src, out, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl",
                                                  Q.RECIPE_FILE, Q.REPORT_FILE,
                                                  Q.CALIBRATION_FILE))


def _hopeless_dtype(method: Q.Method, device: str, settings: Settings) -> str | None:
    """bf16/fp16 on a CPU whose matmuls in that dtype measured far slower than fp32
    (loading/machine.py): not worth a full measurement (bf16 ran at 0.01x here)."""
    if device != "cpu" or method.dtype not in ("bfloat16", "float16") or \
            method.name.startswith("bnb-"):  # bitsandbytes computes in fp32 on a CPU
        return None
    from sureserve.loading.machine import SLOW_DTYPE, cpu_speeds

    speeds = cpu_speeds(settings.home_dir())
    ratio = speeds[method.dtype] / max(speeds["float32"], 1e-9)
    if ratio >= SLOW_DTYPE:
        return None
    return (f"{method.dtype} matrix multiplies measured {ratio:.2f}x the fp32 speed on this "
            "CPU (no native support): it cannot be faster, so it was not measured further")


def write_folder(engine: Any, cand: Candidate, base: str, report: dict[str, Any],
                 out: Path) -> None:
    """A model folder ``load`` takes: the base files, the recipe with its golden outputs,
    and everything measured. The weights stay in full precision on disk; loading re-applies
    the recipe (deterministic), and the gate compares the result with the golden outputs."""
    from sureserve.gate.lock import golden_outputs

    _copy_base(engine.loaded.source.path, out)
    q = engine.loaded.quantization
    used = q.calibration if q is not None else None
    recipe = Q.Recipe(cand.method, tuple(cand.full_precision_layers), True, base,
                      golden_outputs(engine))
    (out / Q.RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=1) + "\n",
                                     encoding="utf-8")
    if used is not None:  # what loading re-applies the method from
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in used.items()},
                  str(out / Q.CALIBRATION_FILE))
    (out / Q.REPORT_FILE).write_text(json.dumps(report | {"output": str(out)}, indent=1) + "\n",
                                     encoding="utf-8")


def as_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, indent=1, default=lambda x: x.tolist() if isinstance(x, np.ndarray)
                      else str(x))


def print_report(rep: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    b = rep["baseline"]
    console.print(f"{rep['model']} ({rep['task']}, {rep['device']}): baseline float32 "
                  f"{b['per_second']} {b['unit']}, weights {b['weights_mib']} MiB; "
                  f"{rep['eval_texts']} eval texts, {rep['calibration_texts']} calibration")
    fid = {"embed": ("min_cosine", "mean_cosine", "neighbour_overlap"),
           "classify": ("agreement", "max_probability_diff", "accuracy_drop"),
           "generate": ("perplexity_increase", "greedy_agreement", "first_divergence")}
    cols = fid[rep["task"]]
    t = Table("method", "status", "speedup", "weights MiB", *cols, "fp32 layers")
    for c in rep["candidates"]:
        t.add_row(c["method"], c["status"], _cell(c["speedup"]), _cell(c["weights_mib"]),
                  *(_cell(c[k]) for k in cols), str(len(c["full_precision_layers"])))
    console.print(t)
    for c in rep["candidates"]:
        console.print(f"  {c['method']}: {c['status']}: {c['reason']}", highlight=False)
    if rep["chosen"]:
        console.print(f"chosen: [bold]{rep['chosen']}[/]"
                      + (f", written to {rep['output']}" if rep["output"] else
                         " (pass -o DIR to write it as a model folder)"))
    elif rep["candidates"]:
        console.print("[bold red]no candidate was accepted[/]: serve the full-precision model")
    vec = rep.get("vectors")
    if vec:
        t = Table("vectors", "status", "recall@10", "min recall@10", "rank agreement p1",
                  "recall@10 decoded", "bytes per vector")
        for m in [*vec["dimensions"], *vec["precisions"]]:
            t.add_row(m["name"] if not m["name"].isdigit() else f"{m['name']} dims",
                      m["status"], _cell(m.get("recall_at_10")),
                      _cell(m.get("recall_at_10_min")), _cell(m.get("rank_agreement_p1")),
                      _cell(m.get("recall_at_10_decoded")), _cell(m.get("bytes_per_vector")))
        console.print(t)
        console.print(f"accepted when recall@10 >= {vec['min_recall']:g}; "
                      + (f"written to {rep['output']} (serve that folder to offer them)"
                         if rep["output"] else "pass -o DIR to write a folder that serves "
                         "the accepted ones"))


def _cell(x: Any) -> str:
    return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)
