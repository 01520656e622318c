"""Optional dependencies: the benchmark's statistics (scipy) and the pictures of the benchmark and
``tools/visualize.py`` (matplotlib), installed with ``pip install 'ppdistill[bench]'``. Training, eval,
infer and export import neither."""
import importlib
from types import ModuleType

from .errors import PPDistillError

__all__ = ['require']


def require(module: str, purpose: str) -> ModuleType:
    """``module`` imported, or a one-line :class:`PPDistillError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split('.')[0]
        raise PPDistillError(f"{purpose} needs {top}, which is not installed: pip install 'ppdistill[bench]' "
                             f'(or pip install {top})') from None
