"""Test environments, each built fresh with the newest releases (``nox``; ``.ci/run`` runs all).

- ``lint``: ruff's format and check.
- ``tests``: the README's test command, in a new virtual environment.
- ``ecosystem``: optimum-onnx pins transformers < 4.58 (and so an older diffusers and
  huggingface_hub), so it gets an environment of its own; there the optimum tests run, and the
  whole suite again at the oldest versions alignkit supports (``.ci/oldest.txt``).
- ``optimum_intel``: optimum-intel pins transformers < 5.6 and huggingface_hub < 1.22: its
  OpenVINO ports are tested in an environment of their own.

torch 2.13.0 goes in first in every environment, and stays (``.ci/torch.txt``): any other
request for torch pulls a CUDA build.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests", "ecosystem", "optimum_intel"]
nox.options.error_on_missing_interpreters = True

TORCH = ("torch==2.13.0", "-c", ".ci/torch.txt")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    session.install(*TORCH)
    session.install("-e", ".[test]", "-c", ".ci/torch.txt")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def ecosystem(session: nox.Session) -> None:
    session.install(*TORCH)
    session.install("-e", ".[test,optimum]", "-c", ".ci/oldest.txt", "-c", ".ci/torch.txt")
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", "-q", "--override-ini=addopts=-ra", "tests/optimum", *session.posargs)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def optimum_intel(session: nox.Session) -> None:
    session.install(*TORCH)
    session.install("-e", ".[test,optimum-intel]", "-c", ".ci/torch.txt")
    # PyPI's torchvision is built against CUDA torch: with the CPU build its operators do not load, and
    # transformers then fails to import its processors. Without it, transformers falls back.
    session.run("python", "-m", "pip", "uninstall", "-y", "torchvision")
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", "-q", "--override-ini=addopts=-ra", "tests/optimum_intel", *session.posargs)
