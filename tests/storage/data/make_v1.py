"""How the version-1 dumps beside this file were written: with alignkit as of commit b728348,
the last to write format version 1 (``git worktree add /tmp/v1 b728348`` and
``PYTHONPATH=/tmp/v1 python make_v1.py tests/storage/data``). They are committed because no
alignkit since writes that layout; ``test_version1.py`` records :func:`record_full`'s run with
today's writer to compare the two."""

import sys
from pathlib import Path

import h5py
import numpy as np
import torch

import alignkit as ak


def record_full(path: Path, label: str = "v1") -> None:
    """bf16 input, python timestep, an escaped output name, arguments, an error, repeated text
    embeddings (stored once), a growing cache (stored as its new positions)."""
    with ak.Recorder(path, label=label) as rec:
        emb = torch.arange(12, dtype=torch.float32).reshape(3, 4)

        def model(sample, timestep, encoder_hidden_states, past, mode="fast"):
            if timestep == 2.5:
                raise ValueError("planted")
            return {"out/put": sample.float() * 2 + encoder_hidden_states.sum(), "past": past}

        m = rec.watch(model, "my/model")
        past = torch.zeros(1, 2, 0, 3)
        for step in range(4):
            past = torch.cat([past, torch.full((1, 2, 1, 3), float(step + 1))], dim=2)
            try:
                m(torch.full((2, 3), float(step), dtype=torch.bfloat16), step + 0.5, emb, past, mode="fast")
            except ValueError:
                pass
            ak.step()


def record_stats(path: Path) -> None:
    """A small MLP recorded as statistics, with layers."""
    lin = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    torch.manual_seed(0)
    with ak.Recorder(path, label="stats", mode="stats", layers=["net"]) as rec:
        net = rec.watch(lin, "net")
        for _ in range(3):
            net(torch.randn(5, 8))
            net(torch.randn(40, 8))
            ak.step()


def record_killed(path: Path) -> None:
    """A full dump without the tables a finished run writes, as a killed run left it."""
    with ak.Recorder(path, label="killed") as rec:
        f = rec.watch(lambda x: x + 1, "f")
        for step in range(3):
            f(np.full(4, float(step), np.float32))
            ak.step()
    with h5py.File(path, "a") as f:
        del f["index"], f["tensors"]
        f.attrs["complete"] = False


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    record_full(out / "v1_full.h5")
    record_stats(out / "v1_stats.h5")
    record_killed(out / "v1_killed.h5")
