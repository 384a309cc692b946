"""Suite-wide setup.

libnbd's ``nbdsh`` runs ``python3 -m nbd``, and Debian installs the ``nbd``
module for the system interpreter (/usr/bin/python3) only. When the tests run
under another interpreter (a venv, pyenv) an ``nbdsh`` shim on PATH makes
nbdsh — in tests and in ``--run`` commands alike — use the system one.
"""

import os
import stat

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="session", autouse=True)
def nbdsh_uses_system_python(tmp_path_factory):
    shims = tmp_path_factory.mktemp("shims")
    shim = shims / "nbdsh"
    shim.write_text(f'#!/bin/sh\nexec {SYSTEM_PYTHON} -m nbd "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{shims}{os.pathsep}{old}"
    yield
    os.environ["PATH"] = old
