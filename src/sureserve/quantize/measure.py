"""Fidelity of a candidate against the full-precision baseline, per task (pure numpy).

Each function takes the baseline's and the candidate's outputs on the same texts and
returns plain numbers; ``score`` reduces them to the one number the verdict and the
sensitivity search compare with a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NEIGHBOURS = 10


@dataclass(frozen=True)
class Thresholds:
    """Accept a candidate only when it holds these on the eval texts (documented defaults;
    ``sureserve quantize`` flags override them)."""

    min_cosine: float = 0.99  # embed: the worst text's cosine with the baseline vector
    min_agreement: float = 0.99  # classify: share of texts with the baseline's label
    max_accuracy_drop: float = 1.0  # classify with labels: accuracy points
    max_perplexity_increase: float = 0.05  # generate: relative, 0.05 = 5%
    #: speed over full precision; below 1 accepts a slower candidate that saves memory
    min_speedup: float = 1.0

    def tightened(self, share: float = 0.5) -> Thresholds:
        """The same limits with only ``share`` of each allowed loss: what the sensitivity
        search aims for on its small calibration slice, so that the larger eval split (whose
        worst text is worse than a small slice's) still holds the real limit."""
        return Thresholds(1 - (1 - self.min_cosine) * share,
                          1 - (1 - self.min_agreement) * share,
                          self.max_accuracy_drop * share, self.max_perplexity_increase * share,
                          self.min_speedup)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed_fidelity(ref: np.ndarray, cand: np.ndarray) -> dict[str, Any]:
    """Cosine per text with the baseline; top-10 neighbour overlap within the eval set."""
    a, b = _unit(ref.astype(np.float64)), _unit(cand.astype(np.float64))
    cos = (a * b).sum(1)
    k = min(NEIGHBOURS, len(a) - 1)
    overlap = None
    if k > 0:
        def top(u: np.ndarray) -> np.ndarray:
            sim = u @ u.T
            np.fill_diagonal(sim, -np.inf)
            return np.argsort(-sim, axis=1)[:, :k]
        ta, tb = top(a), top(b)
        overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb, strict=True)]))
    return {"min_cosine": float(cos.min()), "p1_cosine": float(np.percentile(cos, 1)),
            "mean_cosine": float(cos.mean()), "neighbour_overlap": overlap}


def classify_fidelity(ref_probs: np.ndarray, cand_probs: np.ndarray,
                      labels: Sequence[int] | None = None) -> dict[str, Any]:
    """Label agreement with the baseline, the largest probability difference, and with
    gold labels (class indices) the accuracy of both and the drop in points."""
    ra, ca = ref_probs.argmax(1), cand_probs.argmax(1)
    out: dict[str, Any] = {"agreement": float((ra == ca).mean()),
                           "max_probability_diff": float(np.abs(ref_probs - cand_probs).max()),
                           "accuracy": None, "baseline_accuracy": None, "accuracy_drop": None}
    if labels is not None:
        gold = np.asarray(labels)
        base_acc, acc = float((ra == gold).mean()), float((ca == gold).mean())
        out.update(accuracy=acc, baseline_accuracy=base_acc,
                   accuracy_drop=round(100 * (base_acc - acc), 3))
    return out


def generate_fidelity(ref_tokens: Sequence[Sequence[int]], cand_tokens: Sequence[Sequence[int]],
                      ref_nll: float, cand_nll: float) -> dict[str, Any]:
    """Greedy agreement (share of prompts whose continuations are identical), the mean and
    earliest first divergence, and perplexity (exp of mean token NLL) against the baseline."""
    firsts = []
    for a, b in zip(ref_tokens, cand_tokens, strict=True):
        n = min(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)  # or where one stopped
        firsts.append(None if list(a) == list(b) else first)
    diverged = [f for f in firsts if f is not None]
    ppl_ref, ppl = float(np.exp(ref_nll)), float(np.exp(cand_nll))
    return {"greedy_agreement": float(np.mean([f is None for f in firsts])) if firsts else None,
            "first_divergence": min(diverged) if diverged else None,
            "mean_first_divergence": float(np.mean(diverged)) if diverged else None,
            "baseline_perplexity": ppl_ref, "perplexity": ppl,
            "perplexity_increase": ppl / ppl_ref - 1}


def verdict(task: str, fid: dict[str, Any], t: Thresholds) -> str | None:
    """None when the fidelity holds the thresholds, else the reason it does not."""
    if task == "embed" and fid["min_cosine"] < t.min_cosine:
        return f"min cosine {fid['min_cosine']:.4f} < {t.min_cosine}"
    if task == "classify":
        if fid["agreement"] < t.min_agreement:
            return f"label agreement {fid['agreement']:.2%} < {t.min_agreement:.0%}"
        drop = fid.get("accuracy_drop")
        if drop is not None and drop > t.max_accuracy_drop:
            return f"accuracy drop {drop:.2f} points > {t.max_accuracy_drop}"
    if task == "generate" and fid["perplexity_increase"] > t.max_perplexity_increase:
        return (f"perplexity +{fid['perplexity_increase']:.1%} > "
                f"+{t.max_perplexity_increase:.0%}")
    return None


def damage(task: str, fid: dict[str, Any]) -> float:
    """One number, larger = worse, to rank layers by what quantizing them costs."""
    if task == "embed":
        return 1 - fid["min_cosine"]
    if task == "classify":
        return (1 - fid["agreement"]) + fid["max_probability_diff"]
    return max(0.0, fid["perplexity_increase"])
