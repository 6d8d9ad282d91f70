"""One module per meta-training algorithm; each registers itself in :mod:`metaprep.meta.algorithm`."""
