"""The one lazy matplotlib import of the project (data_prep and dosnet_bv both use it)."""
from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, imported on first use (a figure
    is only drawn at the end of a run; importing matplotlib up front costs every command time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
