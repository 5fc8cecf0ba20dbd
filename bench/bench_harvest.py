"""Harvesting cost against bare forward passes (issue 4 targets).

    pytest bench/bench_harvest.py --benchmark-only --benchmark-group-by=group

Two random Llama-style models (hidden 256, 8 layers, MLP 1024, vocab 5504: the lm_head /
decoder-stack parameter ratio of Qwen2.5-1.5B, ~0.17) are built from a config into a temporary
folder; the data is a jsonl of random words. On the same token batches (4 batches of 8 x 128),
the group compares:

- ``forward-full``: both models' complete forward passes (all layers and the lm_head);
- ``forward-to-layer``: both models truncated to the first L = 4 layers (nothing captured):
  the compute a harvest at half depth cannot avoid;
- ``harvest``: ``fastxc.data.harvest.harvest`` end to end into a fresh store (bf16): data loading,
  tokenization, the forward passes that stop at layer 4, filtering, encoding, checksums,
  atomic writes and the manifest; ``load`` (tokenizers, configs and models, which a harvest
  also does once) is timed on its own and subtracted for the overhead figure.

The last test records ``harvest_overhead`` = (harvest - load) / forward-to-layer - 1 (target
<= 0.10) and ``stop_at_layer_saving`` = 1 - forward-to-layer / forward-full in extra_info.
"""
import json
import shutil

import numpy as np
import pytest
import torch

from fastxc.data import harvest as H

CTX, BATCH, N_BATCHES, LAYER = 128, 8, 4, 4
WORDS = ("the a cat dog sat ran on to house tree red old new wait so two plus three is five therefore "
         "answer but however check again alternatively think step bird fish water sun moon").split()
RESULTS: dict[str, float] = {}


def _build(root):
    from tiny_models import build_llama_pair

    dirs, tok = build_llama_pair(root, sorted(set(WORDS)), vocab_size=5504, hidden=256, intermediate=1024,
                                 layers=8, heads=8, max_positions=512)
    # one document per sequence, exactly CTX - 1 words: every batch is full, no padding
    rng = np.random.default_rng(0)
    ds = root / "data.jsonl"
    with open(ds, "w") as f:
        for _ in range(BATCH * N_BATCHES):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=CTX - 1))}) + "\n")
    return dirs, ds, tok


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_harvest")
    dirs, ds, tok = _build(root)
    texts = [json.loads(l)["text"] for l in open(ds)]
    ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts])
    assert ids.shape == (BATCH * N_BATCHES, CTX)
    yield {"root": root, "dirs": dirs, "ds": ds, "batches": ids.split(BATCH)}
    shutil.rmtree(root)


def _models(dirs):
    from transformers import AutoModelForCausalLM

    return [AutoModelForCausalLM.from_pretrained(str(d)).eval() for d in dirs]


def _record(benchmark, name):
    RESULTS[name] = benchmark.stats.stats.min  # min: the least disturbed run on a shared machine
    benchmark.extra_info["tokens"] = BATCH * N_BATCHES * CTX * 2


@pytest.mark.benchmark(group="harvest-2-models-4x8x128")
def test_forward_full(benchmark, setup):
    ms = _models(setup["dirs"])

    @torch.inference_mode()
    def run():
        for b in setup["batches"]:
            for m in ms:
                m(input_ids=b, use_cache=False)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, "forward-full")


@pytest.mark.benchmark(group="harvest-2-models-4x8x128")
def test_forward_to_layer(benchmark, setup):
    ms = _models(setup["dirs"])
    for m in ms:  # the bare truncated model: layers >= LAYER removed, no hooks
        m.model.layers = m.model.layers[:LAYER]
        m.model.config.num_hidden_layers = LAYER

    @torch.inference_mode()
    def run():
        for b in setup["batches"]:
            for m in ms:
                m.model(input_ids=b, use_cache=False)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, "forward-to-layer")


@pytest.mark.benchmark(group="harvest-2-models-4x8x128")
def test_load(benchmark, setup):
    from fastxc.data.models import load_config, load_model, load_tokenizer

    def run():
        for d in setup["dirs"]:
            load_tokenizer(str(d))
            load_config(str(d))
            load_model(str(d))

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, "load")


@pytest.mark.benchmark(group="harvest-2-models-4x8x128")
def test_harvest(benchmark, setup):
    n = {"i": 0}
    tokens = BATCH * N_BATCHES * (CTX - 1)  # every non-BOS position

    def run():
        n["i"] += 1
        out = setup["root"] / f"store{n['i']}"
        H.harvest([str(d) for d in setup["dirs"]], out, [str(setup["ds"])], tokens=tokens, layer=LAYER,
                  context_length=CTX, batch_size=BATCH, progress=False, outlier_factor=0)
        shutil.rmtree(out)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, "harvest")
    fwd, full, load, hv = (RESULTS.get(k) for k in ("forward-to-layer", "forward-full", "load", "harvest"))
    if None not in (fwd, full, load):
        benchmark.extra_info["harvest_overhead"] = round((hv - load) / fwd - 1, 4)
        benchmark.extra_info["harvest_overhead_with_load"] = round(hv / fwd - 1, 4)
        benchmark.extra_info["stop_at_layer_saving"] = round(1 - fwd / full, 4)
        print(f"\nharvest overhead over forward-to-layer: {(hv - load) / fwd - 1:+.1%} "
              f"(with model loading {hv / fwd - 1:+.1%}); stop-at-layer saving vs full forward: {1 - fwd / full:.1%}")
