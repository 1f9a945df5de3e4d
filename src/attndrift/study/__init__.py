"""Studies: a YAML spec expanded into runs, a crash-safe run store, local and Ray executors."""

MAX_RUNS = 10_000  # default cap on a study's size (`attndrift study run|plan --max-runs`)
