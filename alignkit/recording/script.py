"""Run a user's script or module unmodified inside a recording."""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alignkit.errors import UsageError

_PYTHONS = {"python", "python3", Path(sys.executable).name}


def split_command(command: list[str]) -> tuple[str, str, list[str]]:
    """``[python] script.py args`` or ``[python] -m module args`` → (kind, target, argv)."""
    args = list(command)
    if args and (Path(args[0]).name in _PYTHONS or args[0] == sys.executable):
        args = args[1:]
    if not args:
        raise UsageError("record needs a script to run: alignkit record -o dump.h5 -- script.py [args]")
    if args[0] == "-m":
        if len(args) < 2:
            raise UsageError("record -m needs a module name")
        return "module", args[1], args[1:]
    if args[0].startswith("-"):
        raise UsageError(
            f"{args[0]}: Python's own options cannot be given here, the script runs in alignkit's interpreter; "
            f"give them to that one: python {args[0]} -m alignkit record … -- script.py"
        )
    script = Path(args[0])
    if not script.is_file():
        raise UsageError(f"{script}: no such script")
    return "script", str(script), args


def search_path(kind: str, target: str) -> str:
    """The folder Python puts first on ``sys.path`` for this script (the current one for ``-m``)."""
    return os.path.dirname(os.path.abspath(target)) if kind == "script" else os.getcwd()


@contextmanager
def importing_as_the_script(kind: str, target: str) -> Iterator[None]:
    """Import as the script will (``--hook engine:EngineOV`` finds ``engine.py`` beside it)."""
    saved = sys.path[:]
    sys.path.insert(0, search_path(kind, target))
    try:
        yield
    finally:
        sys.path[:] = saved


def run(kind: str, target: str, argv: list[str]) -> tuple[int, BaseException | None]:
    """Run it as ``__main__``; returns its exit code (its own traceback printed as Python would)
    and the exception that ended it, if one did."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = argv if kind == "module" else [target, *argv[1:]]
    sys.path.insert(0, search_path(kind, target))
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
        return 0, None
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0, None
        if isinstance(code, int):
            return code, None
        print(code, file=sys.stderr)
        return 1, None
    except KeyboardInterrupt as exc:  # Ctrl-C: the traceback Python prints, and the shell's 128 + SIGINT
        _print_user_traceback()
        return 130, exc
    except BaseException as exc:
        _print_user_traceback()
        return 1, exc
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def _print_user_traceback() -> None:
    """The traceback from the user's script down: alignkit's and runpy's frames above it left out."""
    etype, value, tb = sys.exc_info()
    while tb is not None and _above_the_script(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    traceback.print_exception(etype, value, tb)


_PACKAGE = os.path.dirname(os.path.dirname(__file__)) + os.sep  # alignkit/, as its frames name it


def _above_the_script(filename: str) -> bool:
    return filename.startswith(_PACKAGE) or filename == runpy.__file__ or filename.startswith("<frozen runpy")
