"""The README's SAELens adapter (``FastTopKTrainingSAE``, the ```python block marked
``<!-- readme-python: saelens-topk -->`` in "Using the kernels in your SAE", exec'd here as
written) against the real sae-lens TopK training SAE it extends: the training step (losses,
reconstruction, code, every gradient), the dense-code API (encode, decode, forward) and a short
run of sae-lens' own SAETrainer, all fp32.

Tolerances are max|fast - sae-lens| / max|sae-lens| (``rel_err``), measured over the cases below
(sae-lens 6.54.12, torch 2.13, 2-core x86 CPU) and written at each assert.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install 'fastxc[saelens]')")

from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

from test_readme_kernels import exec_readme, rel_err  # noqa: E402

D_IN, D_SAE, K = 24, 96, 6


@pytest.fixture(scope="module")
def Fast():
    """The README's FastTopKTrainingSAE class."""
    return exec_readme("saelens-topk", {"__name__": "readme_saelens_topk"})["FastTopKTrainingSAE"]


@pytest.fixture
def one_thread():
    """Tiny ops: on the shared 2-core machine a second intra-op thread costs more than it gives."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def config(**kw):
    # on the default device, which conftest makes CUDA for backend="triton" cases on a GPU machine
    return TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, device=str(torch.empty(0).device), **kw)


def pair(Fast, **kw):
    """(sae-lens' TopKTrainingSAE, the adapter) with the same weights, moved off the init (biases
    non-zero, decoder rows of unequal norms) so that every term of the math matters."""
    ref = TopKTrainingSAE(config(**kw))
    with torch.no_grad():
        ref.b_dec.normal_(0, 0.1)
        ref.b_enc.normal_(0, 0.1)
        ref.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    fast = Fast(config(**kw))
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def step_input(x, dead):
    return TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0,
                          is_logging_step=False)


def step_cases():
    """backend x (rescale_acts_by_decoder_norm, apply_b_dec_to_input) x AuxK on / off; the Triton
    interpreter takes ~6 s a case on 2 cores, so two of its six run by default, all under -m slow."""
    out = []
    for backend in ("reference", "cpu", "triton"):
        for rescale, apply_b_dec, rid in ((True, True, "rescale-bdec"), (False, True, "norescale-bdec"),
                                          (True, False, "rescale-nobdec")):
            for dead, did in ((False, "no-dead"), (True, "auxk")):
                slow = backend == "triton" and (rid, did) not in (("rescale-bdec", "auxk"), ("norescale-bdec", "no-dead"))
                out.append(pytest.param(backend, rescale, apply_b_dec, dead, id=f"{backend}-{rid}-{did}",
                                        marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("backend,rescale,apply_b_dec,dead", step_cases())
def test_training_step_matches_sae_lens(Fast, backend, rescale, apply_b_dec, dead, monkeypatch):
    """training_forward_pass: losses, sae_out, feature_acts and the gradient of every parameter.
    Measured worst rel_err over these 18 cases: losses 1.6e-7, sae_out 1.4e-7, feature_acts
    1.5e-7, gradients 3.2e-7 (fp32 sums in another order); asserted <= 1e-6."""
    monkeypatch.setenv("FASTXC_BACKEND", backend)
    ref, fast = pair(Fast, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(40, D_IN) + 0.3
    mask = torch.rand(D_SAE) < 0.3 if dead else None   # AuxK runs only when features are dead
    outs = []
    for sae in (ref, fast):
        out = sae.training_forward_pass(step_input(x, mask))
        out.loss.backward()
        outs.append(out)
    a, b = outs
    assert set(b.losses) == set(a.losses) == {"mse_loss", "auxiliary_reconstruction_loss"}
    assert (a.losses["auxiliary_reconstruction_loss"] > 0) == dead
    assert rel_err(b.losses["mse_loss"], a.losses["mse_loss"]) <= 1e-6
    if dead:
        aux = "auxiliary_reconstruction_loss"
        assert rel_err(b.losses[aux], a.losses[aux]) <= 1e-6
    else:
        assert b.losses["auxiliary_reconstruction_loss"] == 0
    assert rel_err(b.loss, a.loss) <= 1e-6
    assert rel_err(b.sae_out, a.sae_out) <= 1e-6
    assert rel_err(b.feature_acts, a.feature_acts) <= 1e-6
    assert torch.equal(b.feature_acts != 0, a.feature_acts != 0)   # the trainer's firing statistics
    grads = {n: p.grad for n, p in ref.named_parameters()}
    assert set(grads) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    for n, p in fast.named_parameters():
        assert rel_err(p.grad, grads[n]) <= 1e-6, (n, rel_err(p.grad, grads[n]))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.filterwarnings("ignore:Setting use_error_term directly:DeprecationWarning")
def test_dense_code_api_matches_sae_lens(Fast, backend, monkeypatch):
    """encode (a dense [..., d_sae] code), decode (of sae-lens' code), forward, on [B, d_in] and
    [B, T, d_in] inputs, and the error-term forward. Measured worst rel_err (cpu and triton):
    code 2.3e-7, reconstructions 1.4e-7; asserted <= 1e-6."""
    monkeypatch.setenv("FASTXC_BACKEND", backend)
    ref, fast = pair(Fast)
    for x in (torch.randn(16, D_IN), torch.randn(3, 5, D_IN)):
        code = ref.encode(x)
        got = fast.encode(x)
        assert got.shape == code.shape == (*x.shape[:-1], D_SAE)
        assert rel_err(got, code) <= 1e-6
        assert rel_err(fast.decode(code), ref.decode(code)) <= 1e-6
        assert fast(x).shape == x.shape
        assert rel_err(fast(x), ref(x)) <= 1e-6
    x = torch.randn(16, D_IN)
    ref.use_error_term = fast.use_error_term = True
    assert rel_err(fast(x), ref(x)) <= 1e-6   # with the error term the output is x itself
    assert rel_err(fast(x), x) <= 1e-6


def test_adapter_refuses_run_time_normalisation(Fast):
    with pytest.raises(ValueError, match="normalize_activations='layer_norm' rescales the reconstruction"):
        Fast(config(normalize_activations="layer_norm"))


def planted(n, d, n_true, k_true, gen):
    """Rows: sums of k_true of n_true unit directions with weights in [0.5, 1.5], plus 0.3."""
    dirs = torch.randn(n_true, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_true, generator=gen).argsort(1)[:, :k_true]
    w = torch.zeros(n, n_true).scatter(1, idx, 0.5 + torch.rand(n, k_true, generator=gen))
    return w @ dirs + 0.3


def test_sae_trainer_run_matches_sae_lens(Fast, one_thread):
    """200 steps of sae-lens' SAETrainer (Adam, gradient clipping, firing statistics) on planted
    features, once with sae-lens' SAE and once with the adapter, same init and batches.

    The loss curves agree within 2.3e-7 relative at every step (measured over seeds 0-5; this is
    seed 0: 1.6e-7); asserted <= 2e-6. The dead-feature window is longer than the run, so AuxK
    stays off: with it on, AuxK's top-k over the dead features' pre-activations meets near-ties
    (values within rounding of each other), and after one of them picks differently the two
    runs drift apart (2 of 6 seeds, by up to 9% of the loss after 200 steps); AuxK itself is
    matched step by step in test_training_step_matches_sae_lens."""
    d, F, k, B, steps = 32, 64, 4, 256, 200
    gen = torch.Generator().manual_seed(0)
    data = planted(steps * B, d, F // 4, 3, gen)
    runs = []
    for cls in (TopKTrainingSAE, Fast):
        torch.manual_seed(0)
        sae = cls(TopKTrainingSAEConfig(d_in=d, d_sae=F, k=k))
        trainer = SAETrainer(SAETrainerConfig(total_training_samples=steps * B, train_batch_size_samples=B,
                                              lr=1e-3, lr_end=1e-3, dead_feature_window=10 * steps),
                             sae, iter(()))
        losses = []
        for batch in data.split(B):
            losses.append(trainer.step(batch).loss.item())   # fit()'s step, without its logging
            trainer.n_training_steps += 1
        runs.append((torch.tensor(losses, dtype=torch.float64), trainer))
    (ref_curve, ref_tr), (fast_curve, fast_tr) = runs
    assert ref_curve[-20:].mean() < 0.3 * ref_curve[0]   # it trains: 6.40 -> 1.68 (last 20 steps)
    rel = (fast_curve - ref_curve).abs() / ref_curve
    assert rel.max() <= 2e-6, f"loss curves differ by {float(rel.max()):.2e} at step {int(rel.argmax())}"
    # the trainer's firing statistics come from the adapter's dense feature_acts
    assert torch.equal(fast_tr.act_freq_scores, ref_tr.act_freq_scores)
    assert torch.equal(fast_tr.n_forward_passes_since_fired, ref_tr.n_forward_passes_since_fired)
