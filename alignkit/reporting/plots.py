"""Plots for the report, drawn with matplotlib (Agg) and returned as embeddable PNG data URIs."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from alignkit.comparison.table import parse_shape

if TYPE_CHECKING:
    from alignkit.comparison.result import Comparison

_TINY = 1e-12


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def error_curves(result: Comparison) -> str | None:
    """Per submodel: output L1 and 1 − cos against step, log scale; replay drawn beside."""
    outs = _outputs_by_step(result.table)
    if outs.empty:
        return None
    replay = _outputs_by_step(result.replay.table) if result.replay is not None else None
    counts = outs.groupby("submodel", sort=False)["step"].nunique()
    submodels = [s for s, n in counts.items() if n > 1] or list(counts.index)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(submodels), 2, figsize=(10, 2.3 * len(submodels)), squeeze=False)
    for row, sub in enumerate(submodels):
        part = outs[outs["submodel"] == sub]
        for col, (metric, title) in enumerate((("l1", "L1 (mean |t − r|)"), ("cos_dist", "1 − cos"))):
            ax = axes[row][col]
            ax.plot(
                part["step"],
                part[metric].clip(lower=_TINY),
                marker="o",
                ms=3,
                label="pipeline (accumulated)",
                color="#c0392b",
            )
            if replay is not None and sub in set(replay["submodel"]):
                rp = replay[replay["submodel"] == sub]
                ax.plot(
                    rp["step"],
                    rp[metric].clip(lower=_TINY),
                    marker="s",
                    ms=3,
                    label="replay (local error)",
                    color="#2471a3",
                )
                ax.legend(fontsize=7)
            ax.set_yscale("log")
            ax.set_title(f"{sub}: {title}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _data_uri(fig)


def _outputs_by_step(table: pd.DataFrame) -> pd.DataFrame:
    outs = table[(table["io"] == "outputs") & table["rel_l1"].notna()]
    return (
        outs.groupby(["submodel", "step"], sort=False).agg(l1=("l1", "max"), cos_dist=("cos_dist", "max")).reset_index()
    )


HEATMAP_ROWS = 40  # tensors drawn at most: the ones that differ most
HEATMAP_STEP_LABELS = 30  # step labels at most along the bottom (an LLM makes a step a token)


def heatmap_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The compared tensor pairs the heatmap draws from (layers are in the drill-down)."""
    return table[table["rel_l1"].notna() & (table["io"] != "layers")]


def heatmap(result: Comparison) -> str | None:
    """Tensors × steps, coloured by log10 of relative L1; the HEATMAP_ROWS tensors that differ
    most when there are more (layers are in the drill-down, not here)."""
    t = heatmap_rows(result.table)
    if t.empty:
        return None
    labels = t["submodel"] + " " + t["io"].str[:-1] + " " + t["tensor"]
    grid = t.assign(label=labels).pivot_table(index="label", columns="step", values="rel_l1", aggfunc="max", sort=False)
    if len(grid) > HEATMAP_ROWS:
        worst = grid.max(axis=1).nlargest(HEATMAP_ROWS).index
        grid = grid[grid.index.isin(worst)]
    values = np.log10(grid.to_numpy(dtype=float).clip(min=_TINY))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(2 + 0.4 * grid.shape[1], 14), 0.8 + 0.28 * grid.shape[0]))
    im = ax.imshow(values, aspect="auto", cmap="magma_r", vmin=-12, vmax=max(0.0, float(np.nanmax(values))))
    ax.set_yticks(range(grid.shape[0]), [str(x) for x in grid.index], fontsize=7)
    every = -(-grid.shape[1] // HEATMAP_STEP_LABELS)  # a label for every step, or every n-th of many
    ax.set_xticks(range(0, grid.shape[1], every), [str(x) for x in grid.columns[::every]], fontsize=7)
    ax.set_xlabel("step", fontsize=8)
    fig.colorbar(im, ax=ax, label="log10 rel_l1")  # no tight_layout: the saved image grows to fit long tensor labels
    return _data_uri(fig)


def image_panels(result: Comparison, ref_dump, tgt_dump, limit: int = 3) -> list[tuple[str, str]]:
    """(title, data URI) for image-like tensors: reference | target | |difference|; of a
    video, the frame that differs most."""
    panels = []
    for row in _image_rows(result.table)[:limit]:
        r = np.asarray(
            ref_dump[row.submodel, int(row.step), int(row.call)].tensor(row.io, row.tensor), dtype=np.float64
        )[0]
        t = np.asarray(
            tgt_dump[row.submodel, int(row.step), int(row.call)].tensor(row.io, row.tgt_tensor), dtype=np.float64
        )[0]
        title = f"{row.submodel} step {int(row.step)} {row.io[:-1]} {row.tensor}"
        if r.ndim == 4:  # channels, frames, height, width
            frames = r.shape[1]
            frame = int(np.argmax(np.nan_to_num(np.abs(t - r), nan=np.inf).mean(axis=(0, 2, 3))))
            r, t = r[:, frame], t[:, frame]
            title += f", frame {frame} of {frames}"
        panels.append((title, _triptych(r, t)))
    return panels


def _image_rows(table: pd.DataFrame) -> list:
    """The final output of the run and the last latents: images (batch, channels, height,
    width) or videos (batch, channels, frames, height, width) of 1–4 channels, at least 8×8;
    not a KV cache (batch, heads, positions, head size), which can take that shape."""
    cands = table[(table["io"] == "outputs") & table["ref_shape"].notna() & (table["ref_shape"] == table["tgt_shape"])]
    cands = cands.assign(_order=range(len(cands))).sort_values(["seq", "_order"], ascending=[False, True])
    picked, seen = [], set()
    for row in cands.itertuples(index=False):
        dims = parse_shape(row.ref_shape)
        kv_cache = row.tensor.startswith(("past_key_values.", "present."))
        if (
            len(dims) in (4, 5)
            and dims[1] in (1, 3, 4)
            and min(dims[-2:]) >= 8
            and row.submodel not in seen
            and not kv_cache
        ):
            picked.append(row)
            seen.add(row.submodel)
    return picked


def _triptych(r: np.ndarray, t: np.ndarray) -> str:
    """Reference, target and their largest difference over the channels, from (C, H, W)."""
    diff = np.abs(t - r)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
    lo, hi = np.nanmin(r), np.nanmax(r)
    for ax, img, title in zip(axes, (r, t, diff), ("reference", "target", "|difference|")):
        shown = _to_rgb(img, lo, hi) if title != "|difference|" else img.max(axis=0)
        ax.imshow(shown, cmap=None if shown.ndim == 3 else "inferno")
        ax.set_title(title if title != "|difference|" else f"|difference| (max {diff.max():.3g})", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return _data_uri(fig)


def _to_rgb(chw: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (chw - lo) / (hi - lo) if hi > lo else np.zeros_like(chw)
    scaled = np.nan_to_num(scaled.clip(0, 1))
    if chw.shape[0] == 3:
        return scaled.transpose(1, 2, 0)
    return scaled[0]
