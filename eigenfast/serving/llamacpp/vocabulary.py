"""The vocabulary a GGUF file carries: the model's tokenizer where llama.cpp has one like it,
otherwise a placeholder of the model's size (the engine then runs on token ids).

llama.cpp tokenizes with a fixed set of algorithms, and two kinds of tokenizer are written:

* a word-level tokenizer that splits on whitespace and punctuation (``tokenizers``' ``WordLevel``
  model behind a ``Whitespace`` pre-tokenizer, as eigenfast's built-in models have) is its
  WordPiece one (``bert``) with whole words only: that splits text into words at whitespace and
  at each punctuation character, and looks each word up whole (written with the ``▁`` that marks
  a word start); a word not in the vocabulary is the unknown token, as in ``WordLevel``. The one
  difference: a run of punctuation ("+=") is one word for ``Whitespace`` and one word per
  character for llama.cpp;
* GPT-2's byte-level BPE (a ``BPE`` model behind a ``ByteLevel`` pre-tokenizer with GPT-2's regex
  and no prefix space, no normalizer) is llama.cpp's ``gpt2`` tokenizer with its ``gpt-2``
  pre-tokenizer: the same regex split, bytes mapped to the same printable characters, the same
  merges by rank; its tokens and merges are written as they are.

Other tokenizers are refused before anything is written; pass ``tokenizer=None`` for the placeholder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...errors import UnsupportedModelError

WORD_START = "\u2581"
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types (gguf.TokenType)
KEYS = {"unknown": "unk", "padding": "pad", "eos": "eos", "bos": "bos"}  # llama.cpp's key -> HF's attribute
_REFUSED = ("GGUF export writes word-level tokenizers that split on whitespace and punctuation "
            "(tokenizers' WordLevel model with the Whitespace pre-tokenizer) and GPT-2's byte-level BPE (a BPE model "
            "with the ByteLevel pre-tokenizer); this tokenizer {what}. "
            "Pass tokenizer=None to write a placeholder vocabulary and run the engine on token ids")


@dataclass
class Vocabulary:
    """What goes into the file's ``tokenizer.ggml.*`` keys (``model`` "none": the placeholder)."""

    model: str
    size: int
    tokens: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # by llama.cpp's key: "unknown", "eos", ...
    lowercase: bool = False
    merges: list[str] = field(default_factory=list)  # BPE: "left right", by rank


def _backend(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(_REFUSED.format(what=f"is a {type(tokenizer).__name__} without a tokenizers backend"))
    return json.loads(backend.to_str())


def _lowercase(normalizer: dict[str, Any] | None) -> bool:
    if normalizer is None:
        return False
    if normalizer.get("type") == "Lowercase":
        return True
    raise UnsupportedModelError(_REFUSED.format(what=f"normalizes with {normalizer.get('type')}"))


def vocabulary(tokenizer: Any, size: int) -> Vocabulary:
    """The vocabulary of ``tokenizer`` (None: the placeholder) for a model with ``size`` logits; checks only."""
    if tokenizer is None:
        return Vocabulary(model="none", size=size)
    spec = _backend(tokenizer)
    kind = spec["model"].get("type")
    if kind == "BPE":
        return _byte_level_bpe(tokenizer, spec, size)
    if kind != "WordLevel":
        raise UnsupportedModelError(_REFUSED.format(what=f"is a {kind} model"))
    return _word_level(tokenizer, spec, size)


def _word_level(tokenizer: Any, spec: dict[str, Any], size: int) -> Vocabulary:
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if pre.get("type") != "Whitespace":
        raise UnsupportedModelError(_REFUSED.format(what=f"pre-tokenizes with {pre.get('type')}"))
    lowercase = _lowercase(spec.get("normalizer"))
    words = model["vocab"]
    _check_size(words, size)
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens, types = [f"[unused{i}]" for i in range(size)], [UNUSED] * size
    for word, index in words.items():
        tokens[index] = word if word in special else WORD_START + word
        types[index] = CONTROL if word in special else NORMAL
    ids = _special_ids(tokenizer)
    if "unknown" not in ids:
        raise UnsupportedModelError("the word-level tokenizer has no unknown token, which llama.cpp's WordPiece "
                                    "tokenizer needs: give it one (unk_token), or pass tokenizer=None")
    # llama.cpp's WordPiece defaults put BERT's [CLS]/[SEP]/[MASK] at ids 101-103: every id is set to one of
    # this vocabulary's own, and neither a start nor a separator token is added (the HF tokenizer adds none).
    fallback = ids.get("padding", ids["unknown"])
    for key in ("bos", "seperator", "cls", "mask"):  # "seperator": llama.cpp's spelling of the key
        ids.setdefault(key, fallback)
    return Vocabulary(model="bert", size=size, tokens=tokens, types=types, special_ids=ids, lowercase=lowercase)


def _check_size(words: dict[str, int], size: int) -> None:
    if len(words) > size:
        raise UnsupportedModelError(f"the tokenizer has {len(words)} tokens but the model only {size} logits: "
                                    "pass the tokenizer the model was trained with")


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {key: getattr(tokenizer, f"{name}_token_id", None) for key, name in KEYS.items()}
    return {key: index for key, index in ids.items() if index is not None}


def _byte_level_bpe(tokenizer: Any, spec: dict[str, Any], size: int) -> Vocabulary:
    """GPT-2's byte-level BPE as llama.cpp's ``gpt2`` tokenizer (module docstring); anything that would split or
    merge differently is refused."""
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise UnsupportedModelError(_REFUSED.format(
            what="is a BPE model without GPT-2's byte-level pre-tokenizer (ByteLevel, GPT-2's regex, no prefix space)"))
    if spec.get("normalizer") is not None:
        raise UnsupportedModelError(_REFUSED.format(what=f"normalizes with {spec['normalizer'].get('type')}"))
    different = {name: model.get(name) for name in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                                    "byte_fallback", "ignore_merges") if model.get(name)}
    if different:
        raise UnsupportedModelError(_REFUSED.format(what=f"sets {different}, which llama.cpp's BPE does not do"))
    words = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    _check_size(words, size)
    kinds = {t["content"]: CONTROL if t.get("special") else USER_DEFINED for t in spec.get("added_tokens", [])}
    tokens, types = [f"[unused{i}]" for i in range(size)], [UNUSED] * size
    for word, index in words.items():
        tokens[index], types[index] = word, kinds.get(word, NORMAL)
    ids = _special_ids(tokenizer)
    ends = ids.get("eos", ids.get("bos"))
    if ends is None:
        raise UnsupportedModelError("the BPE tokenizer has neither an end nor a start token, and llama.cpp's gpt2 "
                                    "tokenizer points both at one: give it an eos_token, or pass tokenizer=None")
    ids.setdefault("eos", ends)
    ids.setdefault("bos", ends)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return Vocabulary(model="gpt2", size=size, tokens=tokens, types=types, special_ids=ids, merges=merges)


def write_vocabulary(writer: Any, vocab: Vocabulary) -> None:
    """The ``tokenizer.ggml.*`` keys (and, for the placeholder, the vocabulary size llama.cpp reads instead)."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.model == "none":
        writer.add_vocab_size(vocab.size)
        return
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    for key, index in vocab.special_ids.items():
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", index)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_sep_token(False)
    if vocab.model == "gpt2":
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_merges(vocab.merges)
        return
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", vocab.lowercase)
    writer.add_bool("tokenizer.ggml.normalizer.strip_accents", False)
