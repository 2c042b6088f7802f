"""Converters: one module per architecture (named after its ``model_type``),
each registering its config normalisation and tensor rules."""

from . import plamo2, recurrent_gemma  # noqa: F401  (register the architectures)
from .registry import Architecture, layer_of, lookup, supported, supported_list

__all__ = ["Architecture", "layer_of", "lookup", "supported", "supported_list"]
