"""A killed run, a full disk and a crashing script never cost the dump already written."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

import alignkit as ak
from alignkit.storage.journal import journal_path
from tests.conftest import ROOT

LOOP = textwrap.dedent(
    """
    import sys, time, torch, alignkit as ak
    net = torch.nn.Linear(64, 64)
    with ak.record(sys.argv[1], net, label="long run"):
        for step in range(10_000):
            for _ in range(3):
                net(torch.full((int(sys.argv[2]), 64), float(step)))
            ak.step()
            time.sleep(0.05)
            print("step", step, flush=True)
    """
)


@pytest.mark.parametrize("rows", [8, 4096], ids=["small", "staged"])  # 4096 rows: 1 MiB, written at call time
def test_kill_9_leaves_every_completed_step(tmp_path, rows):
    script, dump = tmp_path / "loop.py", tmp_path / "killed.h5"
    script.write_text(LOOP)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(dump), str(rows)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    for line in proc.stdout:
        if line.strip() == "step 8":
            break
    time.sleep(1.5)  # step boundaries are flushed at most every 0.5 s, and when the writer idles
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with ak.open_dump(dump) as d:  # first: it finishes a flush the kill may have cut in two
        assert d.metadata["complete"] is False or d.metadata["complete"] == 0
        steps = d.steps("Linear")
        assert set(d.tensors["name"]) == {"input", "output"} and len(d.tensors) == 2 * len(d)
        assert set(range(9)) <= set(steps)
        for step in range(9):
            for call in range(3):
                x = d["Linear", step, call].inputs["input"]
                np.testing.assert_array_equal(x, np.full((rows, 64), float(step), np.float32))
        listed = len(d)
    assert not journal_path(dump).exists()
    with h5py.File(dump) as f:  # the tables grow at each flush: a killed run keeps its index
        assert f["index"].shape == (listed,) and f["tensors"].shape == (2 * listed,)


FULL = textwrap.dedent(
    """
    import resource, signal, sys, warnings, numpy as np, alignkit as ak
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (6 << 20, 6 << 20))
    total = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ak.Recorder(sys.argv[1]) as rec:
            f = rec.watch(lambda x: x.sum(), "big")
            for i in range(40):
                total += float(f(np.full((256, 1024), i, np.float32)))
                ak.step()
    print("finished", total, "warned", any("stopped" in str(w.message) for w in caught))
    """
)


def test_a_full_disk_stops_recording_but_not_the_run(tmp_path):
    script, dump = tmp_path / "full.py", tmp_path / "full.h5"
    script.write_text(FULL)
    proc = subprocess.run(
        [sys.executable, str(script), str(dump)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "finished" in proc.stdout and "warned True" in proc.stdout
    with ak.open_dump(dump) as d:
        assert 0 < len(d) < 40
        assert "file-size limit" in d.metadata["stopped"]
        from alignkit.comparison.matching import shortfalls

        assert shortfalls(d, "the target") == [f"recording of the target stopped early: {d.metadata['stopped']}"]
        last = d["big", int(d.calls["step"].max())]
        assert last.inputs["x"].shape == (256, 1024)
        listed = {path for path in d.tensors["path"] if path.startswith("/data/")}
    with h5py.File(dump) as f:  # tensors staged for calls that were dropped are unlinked
        assert {f"/data/{name}" for name in f["data"]} == listed


def test_memory_stays_bounded_by_the_pending_limit(tmp_path):
    import tracemalloc

    source = np.ones((128, 1024), np.float32)  # 512 KiB a call (copied, not staged), 100 MiB in all
    tracemalloc.start()
    with ak.Recorder(tmp_path / "big.h5", max_pending_bytes=8 << 20) as rec:
        f = rec.watch(lambda x: None, "big")
        for _ in range(200):
            f(source)
            ak.step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 32 << 20, f"peak {peak / 2**20:.0f} MiB"
    with ak.open_dump(tmp_path / "big.h5") as d:
        assert len(d) == 200


FORGOTTEN = textwrap.dedent(
    """
    import sys, numpy as np, alignkit as ak
    rec = ak.Recorder(sys.argv[1]).start()
    f = rec.watch(lambda x: x + 1, "f")
    for step in range(5):
        f(np.full(3, step))
        ak.step()
    print("done")  # and never rec.stop()
    """
)


@pytest.mark.parametrize("ending, error", [("", None), ("raise ValueError('bad shape')", "ValueError: bad shape")])
def test_a_recorder_never_stopped_is_stopped_when_the_script_exits(tmp_path, ending, error):
    script, dump = tmp_path / "forgot.py", tmp_path / "forgot.h5"
    script.write_text(FORGOTTEN + ending)
    done = subprocess.run(
        [sys.executable, str(script), str(dump)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == (1 if error else 0), done.stderr
    with ak.open_dump(dump) as d:
        assert d.metadata["complete"] and d.metadata.get("error") == error
        assert len(d) == 5
        np.testing.assert_array_equal(d["f", 4].inputs["x"], np.full(3, 4))
