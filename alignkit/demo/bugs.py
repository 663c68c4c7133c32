"""Planted bugs: what a target port gets wrong, applied to a freshly built pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BUGS: dict[str, str] = {
    "timestep": "the glue truncates the scheduler's fractional timesteps to integers before the UNet (accumulating "
    "drift)",
    "timestep-dtype": "the glue feeds the timestep as int64 where the reference feeds float32, with equal values "
    "(aligned, with a warning)",
    "weights": "the ported UNet's weights are off by about 1% (a local error in the UNet itself)",
    "none": "no bug: the target is the reference run again",
}


EXPECTED_VERDICT: dict[str, str] = {
    "timestep": "diverged",
    "timestep-dtype": "aligned",
    "weights": "diverged",
    "none": "aligned",
}


def scheduler_for(bug: str) -> str:
    """Integer-valued timesteps for the dtype bug; fractional ones otherwise."""
    return "leading" if bug == "timestep-dtype" else "euler"


def plant(pipe: Any, bug: str) -> None:
    """Apply ``bug`` to ``pipe`` in place."""
    _PLANTERS[bug](pipe)


def _timesteps_rewritten(pipe: Any, rewrite: Callable[[Any], Any]) -> None:
    scheduler = pipe.scheduler
    original = scheduler.set_timesteps

    def set_timesteps(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        scheduler.timesteps = rewrite(scheduler.timesteps)

    scheduler.set_timesteps = set_timesteps


def _unet_timestep_cast(pipe: Any) -> None:
    """Glue that casts the timestep to int64 on its way into the UNet (values unchanged)."""
    import torch

    def cast(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) > 1:
            args = (args[0], torch.as_tensor(args[1]).long(), *args[2:])
        elif "timestep" in kwargs:
            kwargs = {**kwargs, "timestep": torch.as_tensor(kwargs["timestep"]).long()}
        return args, kwargs

    pipe.unet.register_forward_pre_hook(cast, with_kwargs=True)


def _perturb_weights(pipe: Any) -> None:
    import torch

    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01 * p.abs().mean())


_PLANTERS: dict[str, Callable[[Any], None]] = {
    "timestep": lambda pipe: _timesteps_rewritten(pipe, lambda t: t.floor()),
    "timestep-dtype": lambda pipe: _unet_timestep_cast(pipe),
    "weights": _perturb_weights,
    "none": lambda pipe: None,
}
