"""What a decode step's attention costs when every row carries its own copy of one shared
prefix, and what reading that prefix once per step would save (BENCHMARKS.md "Generation:
where a shared prefix's time goes", issue #24). Not used by the server: a measurement that
decides whether the decode path should learn it.

Shapes default to smollm2 (30 layers, 9 query heads over 3 key/value heads of 64) at the
bench's shared-prefix workload: 32 rows, a 416-token stored prefix, ~90 columns of their
own (the question, then up to 64 generated tokens). Three ways, float32, every layer's
keys/values a separate tensor as in the batch cache:

- ``full``: one SDPA per layer over every row's whole width (rows of one length);
- ``full_masked_views``: what the decode step runs when rows differ in length: views of the
  batch cache's buffer, a boolean padding mask, each key/value head's query heads side by
  side;
- ``own``: the rows' own columns only (the floor: as if the prefix cost nothing);
- ``cascade``: the prefix once per key/value head for all rows' queries (one product, no
  copy per row), the rows' own columns per row, the two softmax halves merged by their
  log-sum-exp. Plain torch operations, unfused; its largest difference to ``full`` is
  printed (float rounding: not bit-identical, so greedy tokens may differ at near-ties).

    .venv/bin/python scripts/shared_prefix_attention.py [--rows 32] [--prefix 416]
        [--own 90] [-o out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

# this folder (where the script runs from): the decode-step scripts' timing
from step_linears import step_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=416)
    ap.add_argument("--own", type=int, default=90)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("-o", "--out", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    R, H, KVH, D, P, S, L = (a.rows, a.heads, a.kv_heads, a.head_dim, a.prefix, a.own,
                             a.layers)
    g, scale = H // KVH, D ** -0.5
    ks = [torch.randn(R, KVH, P + S, D) for _ in range(L)]
    vs = [torch.randn(R, KVH, P + S, D) for _ in range(L)]
    for k, v in zip(ks, vs, strict=True):  # one prefix, copied into every row
        k[:, :, :P] = k[0:1, :, :P]
        v[:, :, :P] = v[0:1, :, :P]
    q = torch.randn(R, H, 1, D)

    def full() -> None:
        for k, v in zip(ks, vs, strict=True):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    # as the batch cache holds them (views of a buffer with headroom) and rows of different
    # lengths (left padding, so a boolean mask and the group's heads side by side)
    room = 64
    buf_k = torch.zeros(L, R, KVH, P + S + room, D)
    buf_v = torch.zeros_like(buf_k)
    for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
        buf_k[i, :, :, :P + S], buf_v[i, :, :, :P + S] = k, v
    mask = torch.ones(R, 1, 1, P + S, dtype=torch.bool)
    for r in range(R):
        mask[r, :, :, :r % 8] = False

    def full_masked() -> None:
        for i in range(L):
            F.scaled_dot_product_attention(q.reshape(R, KVH, g, D), buf_k[i, :, :, :P + S],
                                           buf_v[i, :, :, :P + S], attn_mask=mask,
                                           scale=scale)

    def own() -> None:
        for k, v in zip(ks, vs, strict=True):
            F.scaled_dot_product_attention(q, k[:, :, P:], v[:, :, P:], enable_gqa=True)

    def cascade_layer(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kp, vp = k[0, :, :P], v[0, :, :P]  # the prefix, read from one row only
        qa = q.view(R, KVH, g, D).permute(1, 0, 2, 3).reshape(KVH, R * g, D)
        s = torch.bmm(qa, kp.transpose(1, 2)) * scale
        ma = s.amax(-1, keepdim=True)
        pa = torch.exp(s - ma)
        la, oa = pa.sum(-1, keepdim=True), torch.bmm(pa, vp)
        qb = q.view(R, KVH, g, D)
        sb = torch.matmul(qb, k[:, :, P:].transpose(-1, -2)) * scale
        mb = sb.amax(-1, keepdim=True)
        pb = torch.exp(sb - mb)
        lb, ob = pb.sum(-1, keepdim=True), torch.matmul(pb, v[:, :, P:])

        def per_row(t: torch.Tensor) -> torch.Tensor:
            return t.view(KVH, R, g, -1).permute(1, 0, 2, 3)

        ma, la, oa = per_row(ma), per_row(la), per_row(oa)
        m = torch.maximum(ma, mb)
        wa, wb = torch.exp(ma - m), torch.exp(mb - m)
        return ((oa * wa + ob * wb) / (la * wa + lb * wb)).reshape(R, H, 1, D)

    def cascade() -> None:
        for k, v in zip(ks, vs, strict=True):
            cascade_layer(k, v)

    diff = max(float((cascade_layer(k, v) - F.scaled_dot_product_attention(
        q, k, v, enable_gqa=True)).abs().max()) for k, v in zip(ks[:3], vs[:3], strict=True))
    rep = {"threads": torch.get_num_threads(), "rows": R, "prefix": P, "own": S, "layers": L,
           "full_ms": round(step_ms(full, 3), 2),
           "full_masked_views_ms": round(step_ms(full_masked, 3), 2),
           "own_ms": round(step_ms(own, 3), 2),
           "cascade_ms": round(step_ms(cascade, 3), 2), "cascade_max_abs_diff": diff}
    print(json.dumps(rep))
    if a.out:
        a.out.write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
