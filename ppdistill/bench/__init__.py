"""Benchmark helpers behind ``tools/benchmark.py``: seed statistics and reports (:mod:`.stats`), plots
(:mod:`.plots`), the step-cost and memory measurements (:mod:`.speed`)."""
