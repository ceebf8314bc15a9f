"""Benchmarks (``make bench`` / ``python -m bench``). Never part of the pass/fail tests: they measure speed,
write JSON and a markdown table to bench/results/, and compare against the targets in the issues."""
