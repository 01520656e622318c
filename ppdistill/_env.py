"""CPU defaults applied before paddle is imported.

Paddle sets ``OMP_NUM_THREADS=1`` when it is unset, and its bundled MKL picks a slow code path on AMD
CPUs; ``OMP_NUM_THREADS=<cores per process>`` with ``MKL_DEBUG_CPU_TYPE=5`` roughly halves a detector's
CPU training step. Values the user already set are never overridden.
"""
import os

__all__ = ['apply_cpu_defaults']


def apply_cpu_defaults() -> dict:
    """Set thread/MKL environment defaults that are still unset; return what was set."""
    procs = int(os.environ.get('PADDLE_TRAINERS_NUM', '1') or 1)
    threads = max(1, (os.cpu_count() or 1) // max(1, procs))
    defaults = {'OMP_NUM_THREADS': str(threads), 'MKL_DEBUG_CPU_TYPE': '5'}
    applied = {}
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied
