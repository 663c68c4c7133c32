"""The dump layout (written down in docs/format.md). Version 2 is written; version 1 is read.

Version 2 stacks the tensors of one name along a call axis, so that a call costs a few rows
instead of HDF5 objects::

    /                      attrs: format="alignkit-dump", format_version=2, run metadata
    /index                 table: seq, submodel, step, call, ordinal, error, and the non-tensor
                           arguments of each side as JSON (one row per call; grows at each flush)
    /tensors               table: one row per tensor: seq, io, name, dtype, shape, and where it is
                           (path, row), how (stored: whole, sample or delta), with its attributes
    /stacks/<n>            the tensors of one (submodel, io, name, stored dtype, shape) under 1 MiB,
                           a row per call (chunked, grown as needed)
    /data/<n>              a tensor of 1 MiB or more, a dataset of its own
    /submodels/<name>      attrs: class, and config (JSON) for diffusers and transformers objects
    /pipeline_calls/<n>    attrs: class, seq (where the call began), arguments (JSON), per pipeline call

Version 1 gave each call a group::

    /                      attrs: format="alignkit-dump", format_version=1, run metadata
    /index                 table: seq, submodel, step, call, ordinal (one row per call)
    /tensors               table: seq, io, name, dtype, shape (one row per tensor)
    /calls/<seq:08d>/      one group per call; attrs: seq, submodel, step, call, ordinal
        inputs/<name>      one dataset per tensor; attrs only where needed: name, dtype, source, device
        outputs/<name>     (same)
        layers/<name>      leaf-layer outputs, when layer recording is on
        inputs.attrs       non-tensor arguments, JSON-encoded
    /submodels/<name>      attrs: class, and config (JSON) for diffusers and transformers objects
    /pipeline_calls/<n>    attrs: class, seq (where the call began), arguments (JSON), per pipeline call
    /staging/<n>           a large tensor written at call time, until its call is written; gone once recording ends

Tensor names are stored percent-encoded where HDF5 cannot hold them (``/``, ``%``, ``.``
alone), and then the exact name is in the dataset's ``name`` attribute; a logical dtype that
HDF5 cannot hold (bfloat16, float8) is in its ``dtype`` attribute.
"""

from __future__ import annotations

import h5py
import numpy as np

FORMAT_NAME = "alignkit-dump"
FORMAT_VERSION = 2
CALLS = "calls"  # version 1: a group per call
STACKS = "stacks"  # version 2: tensors of one name and shape, a row per call
DATA = "data"  # version 2: tensors of STACK_MAX_BYTES and more, each a dataset of its own
STACK_MAX_BYTES = 1 << 20  # a tensor this large is a dataset of its own, which compare reads in blocks
SUBMODELS = "submodels"  # what each submodel is: its class, and its config where it has one
PIPELINE_CALLS = "pipeline_calls"  # the arguments of each call of a watched pipeline
INDEX = "index"
TENSORS = "tensors"
IO_GROUPS = ("inputs", "outputs", "layers")

# Version 2's tables: one row per call, one per tensor (docs/format.md).
INDEX_DTYPE = np.dtype(
    [
        ("seq", "<i8"),
        ("submodel", h5py.string_dtype()),
        ("step", "<i8"),
        ("call", "<i8"),
        ("ordinal", "<i8"),
        ("error", h5py.string_dtype()),
        ("inputs_values", h5py.string_dtype()),
        ("outputs_values", h5py.string_dtype()),
    ]
)

TENSORS_DTYPE = np.dtype(
    [
        ("seq", "<i8"),
        ("io", h5py.string_dtype()),
        ("name", h5py.string_dtype()),
        ("dtype", h5py.string_dtype()),
        ("shape", h5py.vlen_dtype(np.int64)),
        ("path", h5py.string_dtype()),
        ("row", "<i8"),
        ("stored", h5py.string_dtype()),
        ("source", h5py.string_dtype()),
        ("device", h5py.string_dtype()),
        ("grows_from", h5py.string_dtype()),
        ("grows_axis", "<i8"),
        ("spread_rel_l1", "<f8"),
        ("spread_cos_dist", "<f8"),
        ("stats", "<f8", (7,)),
        ("stats_checksum", "<i8"),
    ]
)

# Logical dtypes that HDF5 cannot hold natively, stored as unsigned ints of the same width.
BIT_STORED = {
    "bfloat16": np.uint16,
    "float8_e4m3fn": np.uint8,
    "float8_e4m3fnuz": np.uint8,
    "float8_e5m2": np.uint8,
    "float8_e5m2fnuz": np.uint8,
}


def stands_in(value: object) -> bool:
    """Whether a decoded recorded value only names what it was (``"<DynamicCache>"``,
    ``"<Generator seed=0>"``): what the writer stores for a value JSON cannot hold."""
    return isinstance(value, str) and value.startswith("<") and value.endswith(">")


def call_group_name(seq: int) -> str:
    return f"{CALLS}/{seq:08d}"


def tensor_path(seq: int, io: str, name: str) -> str:
    """The HDF5 path of a tensor's dataset in a version-1 dump."""
    return f"/{call_group_name(seq)}/{io}/{escape_name(name)}"


def row_path(path: str, row: int) -> str:
    """Where a stored tensor is, as one string: a dataset's path, and ``#row`` for a row of a stack."""
    return path if row < 0 else f"{path}#{row}"


def split_row(path: str) -> tuple[str, int]:
    """(dataset path, row) from :func:`row_path`'s string; row -1 for a dataset of its own."""
    dataset, _, row = path.partition("#")
    return dataset, int(row) if row else -1


def escape_name(name: str) -> str:
    """Make a tensor name usable as an HDF5 link name, reversibly."""
    out = name.replace("%", "%25").replace("/", "%2F")
    if out in ("", ".", ".."):
        out = "".join(f"%{ord(c):02X}" for c in out) or "%00"
    return out


def unescape_name(link: str) -> str:
    """The tensor name behind a link name written by :func:`escape_name`."""
    from urllib.parse import unquote

    return unquote(link)


def as_text(value: object) -> str:
    """A string attribute as text (h5py gives fixed-length strings, as other writers make them, as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def tensor_name(link: str, attrs) -> str:
    """A dataset's tensor name: its ``name`` attribute where the link had to be escaped."""
    name = attrs.get("name")
    return str(name) if name is not None else unescape_name(link)


def logical_dtype(ds) -> str:
    """A dataset's logical dtype: its ``dtype`` attribute where HDF5 cannot hold it (bfloat16)."""
    dtype = ds.attrs.get("dtype")
    return str(dtype) if dtype is not None else ds.dtype.name


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float values to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), rounded)


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Turn stored bits into a numpy array a user can compute with.

    bfloat16 widens to float32 exactly; float8 kinds decode through ml_dtypes when it is
    installed and are otherwise returned as their raw bytes.
    """
    if dtype == "bfloat16":
        return bf16_to_float32(raw)
    if dtype in BIT_STORED:
        try:
            import ml_dtypes

            return raw.view(getattr(ml_dtypes, dtype)).astype(np.float32)
        except (ImportError, AttributeError):
            return raw
    return raw


# A statistics recording's figures, in the order of a tensor's ``stats`` attribute (docs/format.md).
STATS_FIGURES = ("stats_min", "stats_max", "stats_mean", "stats_std", "stats_l2", "stats_nan", "stats_inf")
