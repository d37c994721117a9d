"""Per-record work functions for data_prep build tests of the process pool (imported by the
spawned workers, hence a module of their own): one that crashes its worker, one that is slow."""
import os
import signal
import time

from data_prep.build import _work


def crash_on_tio2(job):
    """Featurise as build does, but die of a segfault (as spglib did on symprec -1) on test-TiO2."""
    if "test-TiO2" in str(job[0]):
        os.kill(os.getpid(), signal.SIGSEGV)
    return _work(job)


def slow(job):
    """A record that takes a minute: the build is surely featurising when the test interrupts it."""
    time.sleep(60)
    return _work(job)
