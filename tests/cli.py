"""`verge` commands run through the CLI's own entry point in the test process.

Why: a subprocess per command spent most of the CLI tests' time starting Python and
importing (~0.6 s a command on a quiet 2-core machine, several seconds under load); Click's
runner swaps stdin, stdout, stderr and the environment around the same ``verge.cli.app``. The
answer has a subprocess's shape, and an uncaught exception shows up on stderr as the
traceback a real run would print, so "no Traceback" checks keep their meaning. Commands that
start servers (`verge edge`, `verge control`, `verge up`) still run as processes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from typer.testing import CliRunner


def run_verge(args: Sequence[str], env: Mapping[str, str | None] | None = None,
              cwd: Path | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    """`verge ARGS` with ``env`` on top of this process's environment (None unsets a
    variable), in ``cwd``: its exit code, stdout and stderr."""
    from verge.cli import app

    with contextlib.chdir(cwd or os.getcwd()):
        result = CliRunner().invoke(app, list(args), env=dict(env or {}), input=stdin)
    err = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        err += "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["verge", *args], result.exit_code, result.stdout, err)
