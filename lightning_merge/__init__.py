"""lightning_merge: train transformer LMs from different seeds and merge them by permutation."""

__version__ = "0.1.0"
