"""Converters: one module per architecture (named after its ``model_type``),
each registering its config normalisation and tensor rules.

Every module in this package other than the infrastructure (``registry``,
``rules``) is imported here, so adding an architecture is adding its module:
no list to edit.
"""

import importlib
import pkgutil

from .registry import Architecture, layer_of, lookup, supported, supported_list

_INFRASTRUCTURE = {"registry", "rules"}

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _INFRASTRUCTURE and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")  # registers the architecture

__all__ = ["Architecture", "layer_of", "lookup", "supported", "supported_list"]
