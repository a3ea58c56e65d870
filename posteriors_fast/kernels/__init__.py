"""Kernels behind the hot ops; imported lazily by the dispatch layer."""
