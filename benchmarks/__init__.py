"""Benchmark suite: posteriors_fast against posteriors 0.0.5, same run, as ratios.

Run ``python -m benchmarks`` (``--quick`` for the two-minute version)."""
