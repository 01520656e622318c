"""The Paddle and ppdet that ppdistill runs on: checked when ppdistill is imported, never installed by pip.

``pip install ppdistill`` leaves Paddle and ppdet to the user, as PaddleDetection's own ``setup.py`` does:
Paddle's CPU and GPU builds are different packages (``paddlepaddle``, ``paddlepaddle-gpu``), and many
users run ppdet from a PaddleDetection checkout. ``pip install "ppdistill[cpu]"`` installs the tested CPU
stack instead. A missing or too old Paddle or ppdet stops ``import ppdistill`` with one line saying what
to install (:class:`StackError`).

Supported: Paddle 2.6.x and 3.x; ppdet 2.6.0 (PyPI ``paddledet``) or a PaddleDetection checkout of
release/2.7 or later, or develop. A checkout that was not installed has no ``ppdet.__version__``, and an
installed development tree may report ``0.0.0`` or a ``dev`` version: those are accepted.
"""
import importlib.util
import re
import warnings
from typing import Optional, Tuple

from .errors import PPDistillError

__all__ = ['StackError', 'check_paddle_version', 'check_ppdet_version', 'require_installed', 'INSTALL_HINT']

# What to install, in every message. The extra is the tested CPU stack (see setup.py).
INSTALL_HINT = ('install Paddle for your device (pip install paddlepaddle, or paddlepaddle-gpu following '
                "Paddle's install guide) and ppdet (pip install paddledet==2.6.0, or a PaddleDetection "
                'checkout of release/2.7+ or develop on the Python path), or the tested CPU stack with '
                'pip install "ppdistill[cpu]" (from a ppdistill checkout: pip install -e ".[cpu]")')

PADDLE_MIN = (2, 6)
PADDLE_MAX_MAJOR = 3  # newest tested major version
PPDET_MIN = (2, 6)


class StackError(PPDistillError, ImportError):
    """Paddle or ppdet is missing or unsupported; the message says what to install. An ``ImportError``
    too, so ``import ppdistill`` fails the way a missing dependency usually does."""


def _major_minor(version: Optional[str]) -> Optional[Tuple[int, int]]:
    """``'2.6.2'`` -> ``(2, 6)``; ``None`` for a missing, unparsable or ``0.0.0`` (development) version."""
    match = re.match(r'\s*(\d+)\.(\d+)', str(version or ''))
    if not match:
        return None
    parsed = int(match.group(1)), int(match.group(2))
    return None if parsed == (0, 0) else parsed


def check_paddle_version(version: Optional[str]) -> None:
    """Raise :class:`StackError` for a Paddle older than 2.6; warn (one line) for a newer major than 3.

    A development build (``0.0.0``) or an unparsable version passes."""
    parsed = _major_minor(version)
    if parsed is None:
        return
    if parsed < PADDLE_MIN:
        raise StackError(f'ppdistill needs Paddle 2.6 or 3.x, found paddle {version}: pip install -U '
                         'paddlepaddle (or paddlepaddle-gpu), or the tested CPU stack: pip install "ppdistill[cpu]"')
    if parsed[0] > PADDLE_MAX_MAJOR:
        warnings.warn(f'ppdistill is tested on Paddle 2.6 and 3.x, found paddle {version}', stacklevel=3)


def check_ppdet_version(version: Optional[str]) -> None:
    """Raise :class:`StackError` for a ppdet older than 2.6. A source checkout (no ``__version__``,
    ``0.0.0`` or a development string) passes."""
    parsed = _major_minor(version)
    if parsed is not None and parsed < PPDET_MIN:
        raise StackError(f'ppdistill needs ppdet 2.6 or later, found ppdet {version}: pip install '
                         'paddledet==2.6.0, or use a PaddleDetection checkout of release/2.7+ or develop')


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # an import hook that refuses the name, a broken module entry
        return False


def require_installed() -> None:
    """Raise :class:`StackError` when ``paddle`` or ``ppdet`` cannot be imported (checked without
    importing them, so the message comes before any of their own import errors)."""
    missing = [name for name in ('paddle', 'ppdet') if not _importable(name)]
    if missing:
        raise StackError(f"ppdistill needs {' and '.join(missing)}, not installed: {INSTALL_HINT}")
