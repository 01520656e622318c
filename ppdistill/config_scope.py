"""Build ppdet models without one config or model leaking into another.

ppdet keeps one process-wide ``global_config``: ``load_config`` merges a YAML into it in place, and
``create`` passes config values (and the constructors' default arguments) to instances by reference.
Two upstream failures follow: loading a teacher YAML overwrites the student's reader/LR/epochs/``-o``
values, and a layer that mutates a list argument poisons every later build (ppdet 2.6 ``LCPAN`` appends
to its shared default ``spatial_scales``, so the second PicoDet in a process crashes).

:func:`config_scope` snapshots the global config and restores it on exit; :func:`create_fresh` builds
an architecture with private copies of every list/dict argument, so instances never alias the config or
a function default. :func:`isolated_scope` is a :func:`config_scope` that starts from ppdet's registered
defaults alone, so a teacher built inside it sees its own YAML chain and nothing of the student's.
"""
import contextlib
import copy
from typing import Iterator

from ppdet.core.workspace import create, global_config
from ppdet.core.config.schema import SchemaDict

__all__ = ['config_scope', 'isolated_scope', 'create_fresh']

_MUTABLE = (list, dict)


def _mutable_defaults() -> dict:
    return {(name, key): copy.deepcopy(sv.default)
            for name, value in global_config.items() if isinstance(value, SchemaDict)
            for key, sv in value.schema.items()
            if sv.has_default() and isinstance(sv.default, _MUTABLE)}


# Taken when ppdistill is imported, before any model is built, so a default that a layer mutated
# later (LCPAN.spatial_scales) is still handed out in its original form.
_PRISTINE_DEFAULTS = _mutable_defaults()


def _copy_value(value):
    # Live objects (models, datasets) set into the config by trainers are kept by reference.
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - anything uncopyable is restored by reference
        return value


def _snapshot() -> dict:
    snap = {}
    for key, value in global_config.items():
        content = {k: _copy_value(v) for k, v in value.items()} if isinstance(value, dict) else None
        snap[key] = (value, content)
    return snap


def _restore(snap: dict) -> None:
    for key in list(global_config):
        # Keys added inside the scope go, except class registrations made meanwhile (imports).
        if key not in snap and not isinstance(global_config[key], SchemaDict):
            del global_config[key]
    for key, (value, content) in snap.items():
        if content is not None:
            dict.clear(value)
            dict.update(value, content)
        dict.__setitem__(global_config, key, value)


@contextlib.contextmanager
def config_scope() -> Iterator[dict]:
    """Everything ``load_config``/``merge_config``/``create`` change inside the block is undone on exit."""
    snap = _snapshot()
    try:
        yield global_config
    finally:
        _restore(snap)


@contextlib.contextmanager
def isolated_scope() -> Iterator[dict]:
    """A :func:`config_scope` whose global config starts empty: ppdet's registered defaults only.

    Every registered module's configured values are dropped (its schema defaults remain) and every other
    key (``num_classes``, shared keys such as ``norm_type``, readers, ``-o`` values) is removed, so a YAML
    loaded inside the block is built exactly as if it were the only config ever loaded. All is restored
    on exit.
    """
    with config_scope():
        for key in list(global_config):
            value = global_config[key]
            if isinstance(value, SchemaDict):
                dict.clear(value)
            else:
                del global_config[key]
        yield global_config


def create_fresh(name: str):
    """``create(name)`` where every registered module gets private copies of list/dict arguments."""
    with config_scope():
        for module, value in global_config.items():
            if not isinstance(value, SchemaDict):
                continue
            for key, schema_value in value.schema.items():
                if key in value:
                    if isinstance(dict.__getitem__(value, key), _MUTABLE):
                        dict.__setitem__(value, key, copy.deepcopy(dict.__getitem__(value, key)))
                elif schema_value.has_default() and isinstance(schema_value.default, _MUTABLE):
                    pristine = _PRISTINE_DEFAULTS.get((module, key), schema_value.default)
                    dict.__setitem__(value, key, copy.deepcopy(pristine))
        return create(name)
