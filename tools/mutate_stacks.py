"""Hand-made mutations of ``alignkit/storage/stacks.py``, each run against the tests that
cover it in a scratch copy of the repository: what mutmut does, for a module whose mutants
mutmut times out on here (every mutant reruns most of the suite's recordings).

    python tools/mutate_stacks.py

Prints each mutation and whether a test failed on it (killed) or not (SURVIVED).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/storage",
    "tests/recording/test_stats_mode.py",
    "tests/recording/test_nothing_silent.py::test_repeat_keeps_the_references_run_to_run_spread_and_compare_takes_it_as_its_floor",
    "tests/comparison/test_diagnosis.py",
]
MUTATIONS = [  # (what stacks.py says, what the mutant says)
    ("if data.nbytes >= STACK_MAX_BYTES or data.size == 0:", "if data.nbytes > STACK_MAX_BYTES or data.size == 0:"),
    ("if data.nbytes >= STACK_MAX_BYTES or data.size == 0:", "if data.nbytes >= STACK_MAX_BYTES:"),
    ("rows = max(1, CHUNK_BYTES // row_bytes)", "rows = 1"),
    ("stack.capacity = max(stop, 2 * stack.capacity)", "stack.capacity = stop"),
    ("if stop > stack.capacity:", "if stop >= stack.capacity:"),
    ("if len(stack.pending) > 1 and stack.pending[0].nbytes < WRITE_ALONE_BYTES:", "if len(stack.pending) > 1:"),
    (
        "blocks = [(start + i, row[np.newaxis]) for i, row in enumerate(stack.pending)]",
        "blocks = [(start, row[np.newaxis]) for i, row in enumerate(stack.pending)]",
    ),
    ("stack.written, stack.pending = stop, []", "stack.written, stack.pending = start, []"),
    ("if last is not None and last[:3] == seen:", "if last is not None and last[:2] == seen[:2]:"),
    ("self._previous[key] = (*seen, path, row)\n        self.deltas = True", "self.deltas = True"),
    ("return path, row, row_path(last[3], last[4]), axis", "return path, row, row_path(last[3], last[4]), 0"),
    ("if len(axes) != 1 or data.shape[axes[0]] <= last[2][axes[0]]:", "if data.shape[axes[0]] <= last[2][axes[0]]:"),
    ("elif tensor.stats is not None or tensor.spread is not None:", "elif tensor.stats is not None:"),
    (
        'stored = "sample" if tensor.stats is not None else "delta" if grows_from else "whole"',
        'stored = "sample" if tensor.stats is not None else "whole"',
    ),
    ("self._staged.discard(tensor.staged)", "pass"),
    ("if stack.capacity != stack.rows:", "if False:"),
    (
        "_append(self._table, self._tensors, TENSORS_DTYPE)\n        _append(self._index, self._calls, INDEX_DTYPE)",
        "_append(self._index, self._calls, INDEX_DTYPE)\n        _append(self._table, self._tensors, TENSORS_DTYPE)",
    ),
    ('if tensor.dtype != data.dtype.name:\n                set_attrs(stack.dataset, {"dtype": tensor.dtype})', "pass"),
    ('spread.get("spread_rel_l1", math.nan),', "math.nan,"),
    ('int(stats.get("stats_checksum", 0)),', "0,"),
    ("self._tensors, self._calls = [], []", "self._calls = []"),
    ("json.dumps(record.output_values)", "json.dumps({})"),
    ('record.error or ""', '""'),
]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".nox", "mutants", ".ci", "*.egg-info"))
        target = copy / "alignkit/storage/stacks.py"
        original = target.read_text()
        killed = 0
        for before, after in MUTATIONS:
            if before not in original:
                sys.exit(f"mutation no longer applies (stacks.py changed): {before!r}")
            target.write_text(original.replace(before, after, 1))
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                cwd=copy,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(copy)},
            )
            status = (
                "killed" if run.returncode == 1 else "SURVIVED" if run.returncode == 0 else f"error {run.returncode}"
            )
            killed += status == "killed"
            print(f"{status:9} {before.splitlines()[0][:60]!r} -> {after.splitlines()[0][:50]!r}", flush=True)
        target.write_text(original)
        print(f"{killed} of {len(MUTATIONS)} killed")


if __name__ == "__main__":
    main()
