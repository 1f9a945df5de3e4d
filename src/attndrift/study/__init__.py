"""Studies: a YAML spec expanded into runs, a crash-safe run store, local and Ray executors."""
