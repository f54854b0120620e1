"""Benchmarks: commands, not tests (`python -m bench.<name>` or `bench/run.py <name>`).

Each script measures a stage of the node against the best alternative in the same run and
prints a Markdown table for docs/BENCHMARKS.md. Timing depends on the shapes, not the weights,
so a random-weight bundle of the shipped configuration (`python -m bench.make_bundle`) stands
in for models/default; every script takes `--bundle PATH`.
"""
