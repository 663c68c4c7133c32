"""Running a user's script: its arguments, its exit code, and its own traceback."""

import pytest

from alignkit.errors import UsageError
from alignkit.recording import script


def test_the_python_word_and_module_form_are_understood(tmp_path):
    path = tmp_path / "run.py"
    path.write_text("")
    assert script.split_command(["python", str(path), "--seed", "0"]) == (
        "script",
        str(path),
        [str(path), "--seed", "0"],
    )
    assert script.split_command(["python3", "-m", "pkg.run", "--seed", "0"]) == (
        "module",
        "pkg.run",
        ["pkg.run", "--seed", "0"],
    )


def test_pythons_own_options_are_refused_with_where_to_put_them(tmp_path):
    path = tmp_path / "run.py"
    path.write_text("")
    with pytest.raises(UsageError, match=r"-u: Python's own options .* python -u -m alignkit record"):
        script.split_command(["python", "-u", str(path)])


def test_a_scripts_traceback_starts_at_the_script_wherever_it_lives(tmp_path, capsys):
    folder = tmp_path / "alignkit_port"  # a folder named after the tool hides nothing
    folder.mkdir()
    path = folder / "crash.py"
    path.write_text("def inner():\n    raise KeyError('user bug')\n\ninner()\n")
    code, error = script.run("script", str(path), [str(path)])
    err = capsys.readouterr().err
    assert code == 1 and isinstance(error, KeyError)
    assert err.startswith("Traceback") and 'crash.py", line 4, in <module>' in err and "in inner" in err
    assert "runpy" not in err and "recording" not in err
