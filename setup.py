"""Build hook for the one optional C extension; all other metadata lives in pyproject.toml.

``attndrift.probes._rowstats`` speeds up ERF, Gini and entropy on the CPU (see probes/metrics.py). It is
``optional``: where no C compiler is available the install goes on without it, and metrics.py
computes the same values with numpy and torch.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "attndrift.probes._rowstats",
            ["src/attndrift/probes/_rowstats.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
