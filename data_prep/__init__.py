"""data_prep: sources -> canonical records -> gridded DOS, bond valence targets and structure vector -> one .h5."""
__version__ = "0.1.0"
