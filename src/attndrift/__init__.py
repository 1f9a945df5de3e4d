"""attndrift: what fine-tuning does to a CLIP vision transformer's attention, and what it forgets.

Importing the package has no side effects; heavy modules (torch, transformers) load on use.
"""

from attndrift._version import __version__

__all__ = ["__version__", "load_store"]


def load_store(path, drift: str = "subset_mean"):
    """A run store's runs, tables (``Table.to_pandas()``) and histories: see
    `attndrift.results`. Imported on call, so ``import attndrift`` stays light."""
    import importlib

    return importlib.import_module("attndrift.results").load_store(path, drift)
