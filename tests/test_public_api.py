import subprocess
import sys

import alignkit
from tests.conftest import ROOT, run_python

EXPECTED = {
    "AlignkitError",
    "Call",
    "CallNotFoundError",
    "Comparison",
    "Divergence",
    "Dump",
    "DumpCorruptError",
    "DumpError",
    "FormatVersionError",
    "MissingDependencyError",
    "NotADumpError",
    "RankComparisons",
    "Recorder",
    "RecordingError",
    "UsageError",
    "__version__",
    "compare",
    "compare_ranks",
    "open_dump",
    "record",
    "replay",
    "step",
}


def test_exported_members_do_not_drift():
    assert set(alignkit.__all__) == EXPECTED
    for name in alignkit.__all__:
        assert getattr(alignkit, name) is not None, name


def test_functions_and_their_modules_do_not_shadow_each_other():
    import importlib
    import types

    for name in ("record", "compare", "replay", "step", "open_dump"):
        assert isinstance(getattr(alignkit, name), types.FunctionType), name
    for module in ("recording.recorder", "storage.writer", "comparison.result", "reporting.html", "replaying"):
        assert isinstance(importlib.import_module(f"alignkit.{module}"), types.ModuleType), module
    import alignkit.recording.recorder as recorder

    assert recorder.Recorder is alignkit.Recorder


def test_import_loads_no_heavy_dependency():
    proc = run_python(
        "import sys, alignkit; print(sorted(m for m in ('torch', 'onnxruntime', 'matplotlib', 'diffusers') if m in "
        "sys.modules))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_compare_help_loads_no_heavy_dependency():
    code = (
        "import sys\nfrom alignkit.cli import main\nsys.argv = ['alignkit', 'compare', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'onnxruntime', 'matplotlib') if m in sys.modules))"
    )
    proc = run_python(code)
    assert "LOADED []" in proc.stdout, proc.stdout + proc.stderr


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "alignkit", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    assert "compare" in proc.stdout and "record" in proc.stdout
