"""Benchmarks for tdrlt_peft (run as modules, e.g. ``python -m benchmarks.glue``)."""
