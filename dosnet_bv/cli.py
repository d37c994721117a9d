"""train.py's shared command-line pieces: the one-line-error parser and error tail (the same ones
``python -m data_prep`` uses: ``data_prep.cli``; data_prep imports nothing of dosnet_bv), and the
exit code of a training command."""
from __future__ import annotations

from data_prep.cli import OneLineParser, error_tail
from dosnet_bv.params import TrainError

__all__ = ["OneLineParser", "error_tail", "run_command"]


def run_command(run, prog: str = "train.py") -> int:
    """``run()`` with train.py's error tail: a ``TrainError`` is one line on stderr and exit code 1,
    Ctrl-C exit code 130; an ``OSError`` (disk full, permission, read-only file system) is one line
    too; ``run`` returns nothing on success (exit code 0)."""
    def call() -> int:
        run()
        return 0

    return error_tail(prog, call, (TrainError, OSError))
