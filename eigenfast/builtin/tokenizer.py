"""A word-level tokenizer for the arithmetic tasks.

Every integer 0..400 is one token, so each int_sum answer (up to 198) and each
int_mult answer (up to 361) is a single target token, which eigenfast needs.
"""
from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..errors import ArgumentError

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
MAX_INT = 400
OPERATORS = ("+", "x", "=")


def vocab(extra_words: Sequence[str] = ()) -> dict[str, int]:
    """Specials first so their ids (0, 1, 2) do not move if MAX_INT grows; extra words go last."""
    words = [PAD, UNK, EOS, *(str(i) for i in range(MAX_INT + 1)), *OPERATORS, *extra_words]
    if len(set(words)) != len(words):
        raise ArgumentError(f"extra_words repeat a word already in the vocabulary: {sorted(extra_words)}")
    return {word: index for index, word in enumerate(words)}


def build_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """The HF tokenizer: splits on whitespace and punctuation, one id per word."""
    core = Tokenizer(models.WordLevel(vocab(extra_words), unk_token=UNK))
    # Whitespace (not WhitespaceSplit) also splits "12+7=" into digits and operators.
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # Word-level tokens carry no spacing, so decoding re-inserts single spaces.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        # Left padding keeps every prompt's last token in the last column (see eigenfast.data).
        padding_side="left",
        model_max_length=16,
    )
