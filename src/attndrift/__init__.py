"""attndrift: what fine-tuning does to a CLIP vision transformer's attention, and what it forgets.

Importing the package has no side effects; heavy modules (torch, transformers) load on use.
"""

__version__ = "0.1.0"
