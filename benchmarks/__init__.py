"""Benchmark suite: posteriors_fast against posteriors 0.0.5, same run, as ratios.

Run ``python -m benchmarks`` (``--quick`` for the two-minute version)."""

import sys

import optree
import optree.integrations
import optree.integrations.torch

# posteriors 0.0.5 imports optree.integration.torch, renamed in current optree.
# Done here so that every process importing the suite (also the spawned child
# that probes slow reference calls) can import the reference.
sys.modules.setdefault("optree.integration", optree.integrations)
sys.modules.setdefault("optree.integration.torch", optree.integrations.torch)
