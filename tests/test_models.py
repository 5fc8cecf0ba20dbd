"""fastxc.data.models: the one loader and decoder-layer finder of the harvester and the analyses."""
from __future__ import annotations

import pytest
import torch

from fastxc.data.models import (ModelError, config_dims, decoder_layers, hidden_size, load_config, load_model,
                                load_tokenizer, pad_batch)


def _tiny(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32))
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


@pytest.mark.parametrize("arch, path", [("gpt2", "transformer.h"), ("llama", "model.layers")])
def test_decoder_layers_and_dims(arch, path):
    m = _tiny(arch)
    want = m
    for part in path.split("."):
        want = getattr(want, part)
    assert decoder_layers(m) is want and len(want) == 3
    assert config_dims(m.config) == (16, 3) and hidden_size(m) == 16


def test_decoder_layers_unknown_layout():
    class Odd(torch.nn.Module):
        pass

    with pytest.raises(ModelError, match="cannot find the decoder layer list of Odd"):
        decoder_layers(Odd())


def test_save_and_load_round_trip(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    m = _tiny("llama")
    m.save_pretrained(tmp_path / "m")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1}, unk_token="<pad>")),
                                  pad_token="<pad>")
    tok.save_pretrained(tmp_path / "m")
    got = load_model(tmp_path / "m", dtype="bf16")
    assert not got.training and next(got.parameters()).dtype == torch.bfloat16
    assert config_dims(load_config(str(tmp_path / "m"))) == (16, 3)
    assert load_tokenizer(tmp_path / "m").get_vocab() == {"<pad>": 0, "a": 1}
    with pytest.raises(ModelError, match=r"cannot load model .*nowhere: not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="unknown model dtype 'int4'"):
        load_model(tmp_path / "m", dtype="int4")


def test_pad_batch_right_pads():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
