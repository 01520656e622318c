"""``-o Section.key=value`` overrides that also reach a section the config built as an object.

ppdet's ``merge_config`` merges an override into a section only when that section is a dict; a section
written with a YAML tag (``TrainDataset: !COCODataSet ...``) is an object, so
``-o TrainDataset.dataset_dir=dataset/shapes`` would replace the whole dataset by ``{'dataset_dir': ...}``
and training would fail far from the cause. Here such an override sets the object's attribute instead,
so a run can point the demo configs at another dataset from the command line.
"""
from collections.abc import Mapping
from typing import Any, Dict, Optional

from ppdet.core.workspace import global_config, merge_config

from .errors import PPDistillError

__all__ = ['merge_overrides']


def merge_overrides(opt: Optional[Dict[str, Any]]) -> None:
    """Merge parsed ``-o`` overrides (``{'Section': {'key': value}}`` as ppdet's ArgsParser gives) into
    the global config: into tagged-object sections by attribute, everything else by ``merge_config``.

    Raises PPDistillError for an attribute the object does not have (a misspelt key would otherwise
    be set and ignored)."""
    rest = {}
    for key, value in (opt or {}).items():
        target = global_config.get(key)
        if isinstance(value, Mapping) and target is not None and not isinstance(target, dict) \
                and hasattr(target, '__dict__'):
            for attr, val in value.items():
                if not hasattr(target, attr):
                    raise PPDistillError(f'-o {key}.{attr}: {type(target).__name__} has no attribute {attr!r} '
                                         f'(it has {", ".join(sorted(vars(target)))})')
                setattr(target, attr, val)
        else:
            rest[key] = value
    merge_config(rest)
