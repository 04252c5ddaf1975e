"""A peer for ``sureserve bench quantize``, run by *another* venv's Python: sentence-
transformers' own int8 exports of an embedding model (ONNX Runtime dynamic int8, or
OpenVINO static int8 calibrated on a slice that is not measured).

Standalone on purpose (it must not import sureserve): those exports need optimum-onnx /
optimum-intel, which pin transformers versions ours cannot share. It writes the vectors
(``.npy``) and the timings (``.json``); the bench compares them with its own fp32 vectors.
    python peer_st.py --backend onnx|openvino --model DIR --texts T.json --calib C.json --out D
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path


def _timed_encode(model, texts: list[str]):  # type: ignore[no-untyped-def]
    model.encode(texts[:32], batch_size=32)  # warm-up
    start = time.perf_counter()
    vecs = model.encode(texts, batch_size=32)
    return vecs, len(texts) / (time.perf_counter() - start)


def main() -> None:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("onnx", "openvino"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "model"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(a.model, work)
    texts = json.loads(Path(a.texts).read_text())
    calib = json.loads(Path(a.calib).read_text())
    result: dict[str, object] = {"backend": a.backend}
    import sentence_transformers
    import transformers

    result["versions"] = {"sentence_transformers": sentence_transformers.__version__,
                          "transformers": transformers.__version__}
    if a.backend == "onnx":
        import onnxruntime
        from sentence_transformers import export_dynamic_quantized_onnx_model

        result["versions"]["onnxruntime"] = onnxruntime.__version__  # type: ignore[index]
        fp32 = SentenceTransformer(str(work), backend="onnx", device="cpu")
        fp32.save_pretrained(str(work))  # the exported fp32 ONNX model, next to the weights
        v32, r32 = _timed_encode(fp32, texts)
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        config = "avx512_vnni" if "avx512_vnni" in flags else "avx2"
        result["config"] = config
        export_dynamic_quantized_onnx_model(fp32, config, str(work))
        # its name says the type: model_qint8_avx512_vnni.onnx, model_quint8_avx2.onnx
        name = f"onnx/{next((work / 'onnx').glob(f'model_*int8_{config}.onnx')).name}"
        result["file"] = name
        q = SentenceTransformer(str(work), backend="onnx", device="cpu",
                                model_kwargs={"file_name": name})
    else:
        import openvino
        from optimum.intel import OVQuantizationConfig
        from sentence_transformers import export_static_quantized_openvino_model

        result["versions"]["openvino"] = openvino.__version__  # type: ignore[index]
        # f32 forced: OpenVINO silently runs "fp32" models in bf16 on CPUs with AVX-512 BF16
        fp32 = SentenceTransformer(str(work), backend="openvino", device="cpu",
                                   model_kwargs={"ov_config": {"INFERENCE_PRECISION_HINT": "f32"}})
        fp32.save_pretrained(str(work))
        # measured before the export: export_static_quantized_openvino_model quantizes the
        # model object it is given in place (its "fp32" answers were int8 afterwards)
        v32, r32 = _timed_encode(fp32, texts)
        data = out / "calibration"
        data.mkdir(exist_ok=True)
        with open(data / "train.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text"])
            w.writerows([t] for t in calib)
        export_static_quantized_openvino_model(
            fp32, OVQuantizationConfig(num_samples=len(calib)), str(work),
            dataset_name=str(data), dataset_config_name="default", dataset_split="train",
            column_name="text")
        q = SentenceTransformer(str(work), backend="openvino", device="cpu", model_kwargs={
            "file_name": "openvino/openvino_model_qint8_quantized.xml",
            "ov_config": {"INFERENCE_PRECISION_HINT": "f32"}})
    v8, r8 = _timed_encode(q, texts)
    np.save(out / "fp32.npy", np.asarray(v32, dtype=np.float32))
    np.save(out / "int8.npy", np.asarray(v8, dtype=np.float32))
    result.update(fp32_texts_per_s=r32, int8_texts_per_s=r8)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
