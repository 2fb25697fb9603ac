"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with one `<|endoftext|>` special token.

The special token gets id 0 and serves as both bos and eos between documents. Byte-level
pre-tokenization means every string round-trips exactly (code indentation included).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


def train_tokenizer(docs: Sequence[str], vocab_size: int = 8192, min_frequency: int = 2):
    """Fit a byte-level BPE of `vocab_size` entries (EOT = id 0) on `docs`."""
    if vocab_size < 257 + 1:
        raise ValueError(f"{vocab_size=} must exceed the 256 byte symbols + {EOT}")
    if not docs:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    if tok.token_to_id(EOT) != 0:
        raise AssertionError(f"{EOT} expected at id 0")
    return tok
