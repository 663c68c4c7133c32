import io

import numpy as np
import pytest
from rich.console import Console

import alignkit as ak
from alignkit.reporting.inspect import print_inspection, shape_lines, tensor_summary


def test_a_growing_cache_lists_inputs_first_and_its_shapes_as_first_and_last(tmp_path):
    with ak.Recorder(tmp_path / "llm.h5") as rec:
        decoder = rec.watch(lambda ids, past=None: {"logits": np.zeros((1, 10))}, "decoder")
        decoder(np.zeros((1, 4), np.int64))  # prefill: no cache yet
        for seen in range(4, 10):
            decoder(np.zeros((1, 1), np.int64), np.zeros((1, 2, seen, 8), np.float32))
    with ak.open_dump(tmp_path / "llm.h5") as dump:
        summary = tensor_summary(dump)
        lines = shape_lines(dump)
    assert summary[["io", "tensor"]].values.tolist() == [["inputs", "ids"], ["inputs", "past"], ["outputs", "logits"]]
    shapes = dict(zip(summary["tensor"], summary["shape"]))
    assert shapes["past"] == "[1,2,4,8] … [1,2,9,8] (6 shapes)"
    assert shapes["ids"] == "[1,4],[1,1]"
    assert "  past varies: 1x2x4x8 | … (4 more) | 1x2x9x8" in lines


def test_inspect_says_how_a_run_ended_early_and_what_it_left_out(tmp_path):
    with pytest.raises(KeyboardInterrupt), ak.Recorder(tmp_path / "cut.h5", steps=range(2)) as rec:
        unet = rec.watch(lambda sample: sample, "unet")
        for _ in range(3):
            unet(np.zeros(2))
            ak.step()
        raise KeyboardInterrupt
    out = io.StringIO()
    with ak.open_dump(tmp_path / "cut.h5") as dump:
        print_inspection(dump, Console(file=out, width=200))
    lines = out.getvalue().splitlines()
    assert lines[1:3] == [
        "note: the run ended early, with KeyboardInterrupt",
        "note: the run was recorded with filters (steps 0–1)",
    ]
    assert lines[4].split()[:4] == ["unet", "2", "of", "3"]  # calls recorded, of those the run made
