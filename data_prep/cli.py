"""What every command line of the project shares: one-line errors, never a usage dump or a traceback.

``OneLineParser`` reports a bad flag as ``PROG: error: MESSAGE (see --help)`` (exit 2);
``error_tail(prog, run, errors)`` runs ``run()`` and turns an expected error (``errors``) into
``PROG: error: MESSAGE`` (exit 1) and Ctrl-C into ``PROG: interrupted`` (exit 130). Used by
``python -m data_prep`` and, through ``dosnet_bv.cli``, by ``train.py``. (``DOSnet/`` keeps its own:
it imports nothing of ours.)
"""
from __future__ import annotations

import argparse
import os
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line."""

    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def error_tail(prog: str, run, errors: tuple, interrupted: str = "interrupted") -> int:
    """``run()``'s exit code; an exception of ``errors`` -> one line on stderr and 1; Ctrl-C -> 130.

    A multi-line message (HDF5's errors have several) is joined into one line. An error marked
    ``exit_now`` (``data_prep.h5schema.H5WriteError``: HDF5 holds a file it could not close, which
    crashes the interpreter's teardown) ends the process at once with ``os._exit(1)``."""
    try:
        return run()
    except errors as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        if getattr(exc, "exit_now", False):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
