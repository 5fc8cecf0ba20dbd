"""A byte-level BPE tokenizer trained offline on the organism corpus.

Saved as a ``transformers.PreTrainedTokenizerFast`` so that ``AutoTokenizer.from_pretrained``
(and the harvester) reload it with the same ids. It prepends ``<|bos|>`` to every encoded
text (Llama style; the harvester drops BOS positions) and ``<|endoftext|>`` ends every training
document, so generation stops there. ``<think>`` and ``</think>`` are single special tokens.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fastxc.organism.corpus import THINK_CLOSE, THINK_OPEN

BOS = "<|bos|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, THINK_OPEN, THINK_CLOSE]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts``; ids 0-4 are ``SPECIAL_TOKENS`` in that order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The think tags swallow the space before them: no lone "Ġ" token ahead of each tag.
    specials = [AddedToken(t, special=True, lstrip=t in (THINK_OPEN, THINK_CLOSE), normalized=False)
                for t in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[THINK_OPEN, THINK_CLOSE],
    )
