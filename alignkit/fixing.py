"""``alignkit fix-precision``: from "this layer overflows in fp16" to a verified keep-fp32 list.

Given a reference dump that holds a submodel's inputs and outputs (and its layers), each
candidate build of the submodel in the lower precision is made for real and the recorded
inputs are replayed into it (:func:`alignkit.replay`); the search starts from the drill-down
of the all-lower-precision build (where its errors start), adds one start at a time until the
build aligns at every recorded step, then drops each kept layer that the build does not need.
Builds are bounded; the answer is plain when no set within the budget suffices, or when the
lower-precision build already aligns on this runtime (ONNX Runtime on a CPU runs many fp16
operators through fp32 and may not meet the overflow a real NPU meets).

Three ways to build: a torch module (``--module mod:factory``, kept modules stay fp32 with
their inputs and outputs cast at the boundary), an fp32 ONNX model (``--onnx``, converted with
ONNX Runtime's float16 converter and a node block list), and ``--builder mod:fn``, a
function that takes the keep list and returns a callable, for any other toolchain.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import UsageError

DTYPES = ("fp16", "bf16")


@dataclass
class FixResult:
    """What the search found: the keep list, whether the build with it aligns, and how many
    builds it took; ``files`` are what was written."""

    keep: list[str]
    aligned: bool
    builds: int
    message: str
    files: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


def fix_precision(
    ref: str | os.PathLike,
    *,
    submodel: str,
    dtype: str,
    out: str | os.PathLike,
    onnx: str | os.PathLike | None = None,
    module: str | None = None,
    builder: str | None = None,
    max_builds: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> FixResult:
    """Search the smallest set of layers to keep in fp32 for ``submodel`` in ``dtype``; the
    builds made on the way are removed when it ends."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if sum(x is not None for x in (onnx, module, builder)) != 1:
        raise UsageError("fix-precision needs one of --onnx model.onnx, --module mod:factory, --builder mod:fn")
    from alignkit.replaying import replay

    with tempfile.TemporaryDirectory(prefix="alignkit-fix-", ignore_cleanup_errors=True) as folder:
        scratch = Path(folder)
        build, blocks = _builds(onnx, module, builder, dtype, scratch)
        runs = 0

        def aligned_with(keep: list[str]) -> tuple[bool, Any]:
            """Build, replay as deployed; where it does not align, replay again with its layers
            exposed (which may stop a runtime fusing them) for the drill-down."""
            nonlocal runs
            runs += 1
            if progress is not None:
                progress(runs, max_builds)
            target = build(keep)
            judged = {"target_precision": {submodel: dtype}}  # the build computes in it, whatever its I/O
            replayed = scratch / "replay.h5"
            result = replay(ref, submodel=submodel, target=target, out=replayed, **judged)
            if result.aligned:
                return True, result
            return False, replay(ref, submodel=submodel, target=target, out=replayed, layers=True, **judged)

        ok, result = aligned_with([])
        if ok:
            return _answer([], True, runs, out, onnx, dtype, already=True)
        keep: list[str] = []
        while not ok and runs < max_builds:
            start = next((k for k in [*_starts(result), *blocks] if k not in keep), None)
            if start is None:
                break
            keep.append(start)
            ok, result = aligned_with(keep)
        if not ok:
            return _answer(keep, False, runs, out, onnx, dtype, no_layers=not _starts(result) and not blocks)
        for layer in list(keep)[:-1]:  # the last one added was needed; each earlier one may not be
            if runs >= max_builds:
                break
            trial = [k for k in keep if k != layer]
            if aligned_with(trial)[0]:
                keep = trial
        return _answer(keep, True, runs, out, onnx, dtype)


def _onnx_blocks(model: Any) -> list[str]:
    """Candidates where the drill-down has none (a reference recorded without layers): the
    model's top-level blocks, in order, and its graph-level nodes as one."""
    from alignkit.recording.onnx_layers import scope_chain

    nodes = list(model.graph.node)
    chains = [scope_chain(node) for node in nodes]
    depth = 0
    while len({c[depth] for c in chains if len(c) > depth}) == 1:  # a wrapper around the model: look inside
        depth += 1
    loose = any(len(chain) <= depth and node.op_type not in _TRIVIAL for node, chain in zip(nodes, chains))
    return [*([GRAPH_LEVEL] if loose else []), *dict.fromkeys(c[depth] for c in chains if len(c) > depth)]


GRAPH_LEVEL = "(graph-level nodes)"  # the nodes of no module: a timestep's casts and embedding glue
_TRIVIAL = {"Identity", "Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Concat", "Slice"}


def _starts(result: Any) -> list[str]:
    """Where the build's errors start (the drill-down's list), else its worst layers."""
    starts = list(result.layers.get("keep_fp32", []))
    if starts:
        return starts
    t = result.table
    bad = t[(t["io"] == "layers") & (t["status"].isin(["mismatch", "nonfinite"]))]
    return list(dict.fromkeys(bad.sort_values("rel_l1", ascending=False)["tensor"]))


Build = Callable[[list[str]], Any]


def _builds(onnx: Any, module: str | None, builder: str | None, dtype: str, scratch: Path) -> tuple[Build, list[str]]:
    """What makes a build from a keep list, and the model's top-level blocks (candidates where
    the drill-down names none; a builder's model is not seen, so it has none)."""
    from alignkit.replaying import factory_from

    if module is not None:
        return _torch_builds(module, dtype)
    if builder is not None:
        fn = factory_from(builder)
        return (lambda keep: _call(builder, fn, list(keep))), []
    return _onnx_builds(Path(onnx), dtype, scratch)


def _call(spec: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise UsageError(f"{spec!r} raised {type(exc).__name__}: {first[0] if first else ''}") from exc


def _torch_builds(spec: str, dtype: str) -> tuple[Build, list[str]]:
    """Builds of the fp32 module ``factory()`` returns: all in ``dtype``, kept modules in fp32
    with their floating inputs cast up and their outputs cast back."""
    import torch

    from alignkit.replaying import factory_from

    made = _call(spec, factory_from(spec))
    if not isinstance(made, torch.nn.Module):
        raise UsageError(f"{spec!r} made a {type(made).__name__}: --module needs a factory that returns a torch module")
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    names = dict(made.named_modules())

    def build(keep: list[str]) -> Any:
        model = copy.deepcopy(made).eval().to(low)
        for name in keep:
            if name not in names:
                raise UsageError(f"{name!r} is not a module of {spec} (e.g. {', '.join(list(names)[1:4])})")
            sub = model.get_submodule(name).float()
            sub.register_forward_pre_hook(lambda m, args: _cast(args, torch.float32))
            sub.register_forward_hook(lambda m, args, out: _cast(out, low))
        return model

    return build, [name for name, _ in made.named_children()]


def _cast(value: Any, dtype: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value


def _onnx_builds(path: Path, dtype: str, scratch: Path) -> tuple[Build, list[str]]:
    """Builds of an fp32 ONNX model in float16, its inputs and outputs kept float32, the nodes
    of each kept layer (by the module scope the exporter wrote into node names) blocked. Each
    build is written to ``scratch`` under a new name, the one before removed: a UNet's build is
    gigabytes, and the search may make sixteen."""
    if dtype != "fp16":
        raise UsageError("--onnx builds fp16 (ONNX Runtime's float16 converter); bf16 needs --builder")
    try:
        import onnx
    except ImportError as exc:
        raise UsageError("--onnx needs onnx: pip install 'alignkit[onnx]'") from exc
    try:
        model = onnx.load(path)
    except Exception as exc:
        raise UsageError(f"{path}: not an ONNX model ({str(exc).strip().splitlines()[0]})") from exc
    made = 0

    def build(keep: list[str]) -> str:
        nonlocal made
        converted = to_fp16(copy.deepcopy(model), node_names(model, keep))
        for earlier in scratch.glob("build_*.onnx"):
            earlier.unlink()
        made += 1
        target = scratch / f"build_{made}.onnx"
        onnx.save(converted, target)
        return str(target)

    return build, _onnx_blocks(model)


def to_fp16(model: Any, blocked: list[str]) -> Any:
    """ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``), float32 inputs
    and outputs kept, the ``blocked`` nodes left in float32 with casts around them."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise UsageError("--onnx needs onnxruntime: pip install 'alignkit[onnx]'") from exc
    return convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)


def node_names(model: Any, layers: list[str]) -> list[str]:
    """The nodes of each layer: those whose name holds its module scope (``/b1/conv/Conv``
    for ``b1.conv``; torch's exporters name nodes so), or the node itself by name."""
    scopes = [f"/{layer.replace('.', '/')}/" for layer in layers]
    return [
        n.name
        for n in model.graph.node
        if any(s in n.name for s in scopes) or n.name in layers or n.output[0] in layers
    ]


def _answer(
    keep: list[str],
    ok: bool,
    builds: int,
    out: Any,
    onnx: Any,
    dtype: str,
    already: bool = False,
    no_layers: bool = False,
) -> FixResult:
    out = Path(out)
    if already:
        where = "ONNX Runtime on this CPU" if onnx is not None else "this runtime"
        message = (
            f"the {dtype} build already aligns on {where}: no layer needs fp32 here (a real NPU may still overflow "
            "where this runtime computes through fp32)"
        )
    elif ok:
        listed = ", ".join(keep)
        message = f"keep {len(keep)} in fp32: {listed} — the {dtype} build then aligns at every recorded step"
    elif no_layers:
        message = (
            f"the {dtype} build does not align, and nothing says where its errors start: record the reference with "
            "--layers of the submodel, so that the search can start from its drill-down"
        )
    else:
        tried = ", ".join(keep) or "none"
        message = f"no keep list within {builds} builds makes the {dtype} build align (last tried: {tried})"
    files = _write_forms(keep, out, onnx, dtype) if ok else []
    return FixResult(keep, ok, builds, f"{message} ({builds} builds)", files)


def _write_forms(keep: list[str], out: Path, onnx: Any, dtype: str) -> list[Path]:
    """The list as converters take it: one name a line, a TPU-MLIR qtable, Polygraphy's
    ``--layer-precisions``; for ``--onnx`` also the fixed model (at ``out``, the list beside)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.with_suffix("") if onnx is not None else out
    listing = base.with_suffix(".txt") if onnx is not None else out
    listing.write_text("".join(f"{k}\n" for k in keep))
    files = [listing]
    names = keep
    if onnx is not None:
        import onnx as onnx_lib

        model = onnx_lib.load(onnx)
        names = node_names(model, keep)
        onnx_lib.save(to_fp16(model, names), out)
        files.insert(0, out)
    qtable = base.with_suffix(".qtable")
    qtable.write_text("# TPU-MLIR qtable: layers kept in F32\n" + "".join(f"{n} F32\n" for n in names))
    precisions = base.with_suffix(".layer-precisions.txt")
    precisions.write_text("--layer-precisions " + " ".join(f"{n}:float32" for n in names) + "\n")
    return [*files, qtable, precisions]
