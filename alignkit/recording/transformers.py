"""transformers' ``generate``: the model it drives is recorded as the submodel ``decoder``.

With no scheduler in a decode loop, each call of the decoder is a step: the prefill, then one
call a token. An optimum ONNX Runtime causal LM (``ORTModelForCausalLM``) is driven by the same
``generate``; the session inside it is recorded under the same name, so the port pairs with
the PyTorch reference without ``--map`` (its ``present.N.key`` outputs pair with the
reference's ``past_key_values.N.key`` by position).
"""

from __future__ import annotations

from typing import Any

from alignkit.recording.optimum import watch_wrapper
from alignkit.recording.seam import CallLog
from alignkit.recording.targets import is_torch_module

DECODER = "decoder"


def watch_generating_model(log: CallLog, model: Any) -> None:
    """Watch the model ``generate`` was called on, once."""
    if log.is_watched(model):
        return
    if watch_wrapper(log, model, DECODER):  # optimum: the session inside
        return
    if is_torch_module(model):
        log.watch(model, DECODER)
