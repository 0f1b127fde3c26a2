"""``asynctrack run [--] COMMAND...``: run a program with MLflow patched, no code changed.

In the style of ``opentelemetry-instrument`` and ``ddtrace-run``: it sets the environment
switch ``ASYNCTRACK_PATCH_MLFLOW=1`` and replaces itself with the command. Every Python
process that then imports MLflow, the program and the processes it starts (spawned
multiprocessing workers, torchrun ranks, DataLoader workers) inherit the switch and patch
MLflow as they import it (see ``asynctrack_mlflow_hook``).
"""

from __future__ import annotations

import os
import shutil
import sys

import click

#: The environment switch (asynctrack_mlflow_hook.ENV_SWITCH; that module is not imported
#: here: it imports MLflow, which would load it again as MLflow's entry point).
ENV_SWITCH = "ASYNCTRACK_PATCH_MLFLOW"


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(command: tuple[str, ...]) -> None:
    """Run COMMAND with MLflow patched: its logging calls go through asynctrack's engine.

    For example `asynctrack run -- python train.py --epochs 3`. The Python processes
    COMMAND starts are patched too (they inherit ASYNCTRACK_PATCH_MLFLOW=1).
    """
    program = shutil.which(command[0])
    if program is None:
        raise click.UsageError(f"command not found: {command[0]}")
    env = dict(os.environ)
    env[ENV_SWITCH] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(program, list(command), env)
