"""Every error eigenfast raises on purpose: catch ``EigenfastError`` to catch them all.

Each class also keeps the builtin base it had before the common base existed
(``DataError`` is still a ``ValueError``...), so older ``except`` clauses still work.
"""
from __future__ import annotations


class EigenfastError(Exception):
    """Base of every error eigenfast raises for bad input, files or models; the message names the fix."""


class DataError(EigenfastError, ValueError):
    """Task data that cannot be used (empty, ragged, multi-token targets, ids outside the vocabulary...)."""


class SavedModelError(EigenfastError, RuntimeError):
    """A saved eigenfast directory that is missing, damaged, or does not match its spec."""


class UnsupportedModelError(EigenfastError, ValueError):
    """The model's architecture has no adapter."""


class PositionIndexError(EigenfastError, IndexError):
    """A token position beyond the calibration length under ``extrapolate="error"``."""


class PositionLimitError(EigenfastError, IndexError):
    """A sequence longer than the model's learned position table (GPT-2's ``n_positions``) can read."""


class ModelLoadError(EigenfastError, ValueError):
    """A ``--model`` that names no built-in model, eigenfast save or usable HF model folder."""


class SaveError(EigenfastError, OSError):
    """A save that could not be written (no space left, no permission, another save writing into the same
    folder); the folder keeps its previous save."""


class ArgumentError(EigenfastError, ValueError):
    """An argument outside its allowed range (a negative threshold, a p above 1, ...)."""


class ArgumentTypeError(EigenfastError, TypeError):
    """An argument of a type eigenfast cannot use (a module attribute a save could not hold as JSON, ...)."""


class UnknownAttributeError(EigenfastError, AttributeError):
    """A module attribute eigenfast was asked to change that the module does not have."""


class OutputExistsError(EigenfastError, FileExistsError):
    """An output directory that holds someone else's files, which eigenfast will not write into."""


class StateError(EigenfastError, RuntimeError):
    """A call made where it cannot run: no process group for ``shard_model``, an ablation hook outside a forward."""


class MissingFilesError(EigenfastError, FileNotFoundError):
    """Files eigenfast ships or needs (a built-in model's weights, a data file) are not where they should be."""


class TransformersVersionError(EigenfastError, TypeError):
    """The installed transformers calls a decoder layer, attention function, rotary embedding, cache or model
    with parameters eigenfast's adapters cannot map (a release outside the supported range)."""


class CircuitFileError(EigenfastError, ValueError):
    """A circuit file (the MIB / EAP-IG graph JSON) that is malformed or whose graph does not match the model's."""
