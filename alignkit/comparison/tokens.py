"""Verdicts in tokens, for a decode loop: what an LLM port is judged by.

A decoder that returns ``logits`` at every step (the prefill, then a call a token) is compared
by what it would generate: the greedy token of the last position at each step, and how many of
the reference's top-k candidates the target also ranks in its top k. An int8 decoder whose
logits differ by 2% may still pick every token the reference picks; that is the figure that
says whether it is acceptable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from alignkit.storage.reader import Dump

TOP_K = 5
LOGITS = "logits"


def token_agreement(ref: Dump, tgt: Dump, calls: pd.DataFrame) -> dict[str, Any]:
    """Per step of the decoder: the greedy tokens of both runs and the top-k agreement; empty
    where no submodel of both runs returns ``logits``."""
    matched = calls.dropna(subset=["ref_seq", "tgt_seq"]).sort_values("ref_seq")
    for submodel, group in matched.groupby("submodel", sort=False):
        rows = []
        for ref_seq, tgt_seq, step in zip(group["ref_seq"], group["tgt_seq"], group["step"]):
            ref_out, tgt_out = ref.call_at(int(ref_seq)).outputs, tgt.call_at(int(tgt_seq)).outputs
            if LOGITS not in ref_out or LOGITS not in tgt_out:
                break
            rows.append(_step(int(step), _last_position(ref_out[LOGITS]), _last_position(tgt_out[LOGITS])))
        if rows:
            return _summary(str(submodel), rows)
    return {}


def _last_position(logits: np.ndarray) -> np.ndarray:
    """The logits that choose the next token: the last position's, ``[batch, vocab]``."""
    x = np.asarray(logits, dtype=np.float64)
    return x[:, -1, :] if x.ndim == 3 else x.reshape(-1, x.shape[-1])[-1:]


def _step(step: int, ref: np.ndarray, tgt: np.ndarray) -> dict[str, Any]:
    k = min(TOP_K, ref.shape[-1])
    ref_top = np.argsort(-ref, axis=-1)[:, :k]
    tgt_top = np.argsort(-tgt, axis=-1)[:, :k]
    shared = np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, tgt_top)])
    return {
        "step": step,
        "ref_token": ref_top[:, 0].tolist(),
        "tgt_token": tgt_top[:, 0].tolist(),
        "same": bool((ref_top[:, 0] == tgt_top[:, 0]).all()),
        "top_k": float(shared),
    }


def _summary(submodel: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    differs = [r["step"] for r in rows if not r["same"]]
    return {
        "submodel": submodel,
        "k": TOP_K,
        "steps": len(rows),
        "identical": len(rows) - len(differs),
        "first_differs": differs[0] if differs else None,
        "per_step": rows,
    }


def tokens_text(t: dict[str, Any]) -> str:
    """``decoder: the greedy token is the reference's at 4 of 4 steps; top-5 agreement 100%…``"""
    if not t:
        return ""
    worst = min(t["per_step"], key=lambda r: r["top_k"])
    mean = np.mean([r["top_k"] for r in t["per_step"]])
    text = f"{t['submodel']}: the greedy token is the reference's at {t['identical']} of {t['steps']} steps"
    if t["first_differs"] is not None:
        row = next(r for r in t["per_step"] if r["step"] == t["first_differs"])
        text += f" (first differs at step {row['step']}: {row['ref_token']} → {row['tgt_token']})"
    text += f"; top-{t['k']} agreement {mean:.0%} on average"
    if worst["top_k"] < 1:
        text += f", {worst['top_k']:.0%} at worst (step {worst['step']})"
    return text
