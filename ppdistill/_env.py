"""CPU defaults applied before paddle is imported, and the third-party import noise it would cause.

Paddle sets ``OMP_NUM_THREADS=1`` when it is unset, and its bundled MKL picks a slow code path on AMD
CPUs; ``OMP_NUM_THREADS=<cores per process>`` with ``MKL_DEBUG_CPU_TYPE=5`` roughly halves a detector's
CPU training step. Values the user already set are never overridden.
"""
import contextlib
import os
import sys
import warnings
from typing import Iterator, Tuple

__all__ = ['apply_cpu_defaults', 'quiet_third_party_imports', 'IMPORT_NOISE']

# Printed while paddle/ppdet import, none of which a ppdistill user can act on: ppdet's PP-Tracking (MOT)
# modules want numba, paddle's warning about the OMP_NUM_THREADS value that apply_cpu_defaults chose on
# purpose, and paddle 3's ccache hint for compiling custom C++ ops (ppdistill compiles none).
IMPORT_NOISE: Tuple[str, ...] = (
    'Warning: Unable to use numba in PP-Tracking',
    'WARNING: OMP_NUM_THREADS set to ',
    'PLEASE USE OMP_NUM_THREADS WISELY.',
)
_CCACHE_WARNING = 'No ccache found. Please be aware that recompiling'


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


class _DropLines:
    """Text stream wrapper that forwards whole lines, except those starting with one of ``prefixes``."""

    def __init__(self, stream, prefixes: Tuple[str, ...]):
        self._stream, self._prefixes, self._pending = stream, prefixes, ''

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split('\n')
        for line in lines:
            if not line.startswith(self._prefixes):
                self._stream.write(line + '\n')
        return len(text)

    def release(self) -> None:
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ''

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def quiet_third_party_imports() -> Iterator[None]:
    """Drop the :data:`IMPORT_NOISE` lines from stdout/stderr inside the block (wrap ``import ppdet``);
    everything else is passed through unchanged. Also ignores paddle's ccache ``UserWarning`` for good."""
    warnings.filterwarnings('ignore', message=_CCACHE_WARNING, category=UserWarning)
    saved = sys.stdout, sys.stderr
    # a stream may be None (no console): nothing to filter there
    sys.stdout, sys.stderr = (s if s is None else _DropLines(s, IMPORT_NOISE) for s in saved)
    try:
        yield
    finally:
        wrapped = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = saved
        for stream in wrapped:
            if isinstance(stream, _DropLines):
                stream.release()
