"""Two random Llama models with one word-level tokenizer, built from a config (no hub): the
models the pipeline benches harvest from."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def build_llama_pair(root: Path, words: Sequence[str], vocab_size: int, hidden: int, intermediate: int,
                     layers: int, heads: int, max_positions: int) -> tuple[list[Path], object]:
    """Save two random ``LlamaForCausalLM`` (seeds 1 and 2) with a word-level tokenizer over
    ``words`` under ``root/model1``, ``root/model2``; returns (their folders, the tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>"] + list(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>")
    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=2)
        d = Path(root) / f"model{seed}"
        LlamaForCausalLM(cfg).save_pretrained(str(d))
        tok.save_pretrained(str(d))
        dirs.append(d)
    return dirs, tok
