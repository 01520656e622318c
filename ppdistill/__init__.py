"""ppdistill: knowledge distillation for PaddleDetection detectors.

Importing the package checks that Paddle and ppdet are installed and supported (:mod:`ppdistill.stack`:
one line saying what to install otherwise), applies CPU thread defaults (before paddle loads, never
overriding the user's environment) and registers every ppdistill class with ppdet's ``@register``/
``create`` so configs can name them: ``Distiller``, ``MGDDistillModel``, ``FocalGlobalDistillModel``,
``FGFIDistillModel`` and the losses (``MGDLoss``, ``FGDLoss``, ...). It also applies the fixes of
:mod:`ppdistill.ppdet_fixes` (ppdet code that cannot run on this Paddle, e.g. ppdet 2.6.0's DINO).
"""
from ._env import apply_cpu_defaults, quiet_third_party_imports
from .stack import check_paddle_version, check_ppdet_version, require_installed

require_installed()
apply_cpu_defaults()

with quiet_third_party_imports():  # drops only the import-time lines listed in _env.IMPORT_NOISE
    import ppdet  # noqa: E402  (before paddle/pycocotools: import order matters with numpy 1.23)
import paddle  # noqa: E402

check_paddle_version(paddle.__version__)
check_ppdet_version(getattr(ppdet, '__version__', None))

from .ppdet_fixes import apply as _apply_ppdet_fixes  # noqa: E402
_apply_ppdet_fixes()  # ppdet 2.6.0's DINO on Paddle >= 2.5 (ppdistill/ppdet_fixes.py)

from . import losses  # noqa: E402,F401
from .distiller import Distiller, DistillConfigError  # noqa: E402,F401
from .errors import PPDistillError  # noqa: E402,F401
from .models import FocalGlobalDistillModel, MGDDistillModel  # noqa: E402,F401
from .models import FGFIDistillModel  # noqa: E402,F401

__version__ = '0.1.0'
