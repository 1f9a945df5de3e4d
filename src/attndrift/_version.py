"""The package version, in a leaf module: code that records it need not import the package."""

__version__ = "0.1.0"
