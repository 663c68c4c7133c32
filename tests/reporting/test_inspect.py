import numpy as np

import alignkit as ak
from alignkit.reporting.inspect import shape_lines, tensor_summary


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
