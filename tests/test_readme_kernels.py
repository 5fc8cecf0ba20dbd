"""README.md, "Using the kernels in your SAE": its claims hold and its ```python blocks run.

A ```python block of that section is marked by an HTML comment on the line before its fence,
``<!-- readme-python: NAME -->``; ``readme_python(NAME)`` returns its code, which the tests here
(and tests/test_saelens_adapter.py, for the SAELens adapter) exec on tiny shapes, so the README's
code is the tested code. Every ```python block of the section must carry a name that a test runs.

Claims checked here:
* ``crosscoder_loss(..., widths=[d])`` is the ordinary single-SAE loss: its mse is SAELens' /
  dictionary_learning's L2 loss and its fvu sparsify's FVU, gradients included;
* ``topk_encode`` is top-k of the pre-activation, then ReLU: its dense code equals SAELens' (top-k
  then ReLU) and dictionary_learning's / sparsify's (ReLU then top-k), and zero-valued slots are
  free to point anywhere;
* the trainer-loss adapter gives dictionary_learning's AutoEncoderTopK L2 loss and gradients.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fastxc.kernels import crosscoder_loss, topk_encode
from fastxc.kernels.codes import code_l0, to_dense

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### Using the kernels in your SAE"
_MARK = re.compile(r"^<!--\s*readme-python:\s*([\w-]+)\s*-->$")
# the blocks the tests run: name -> the test file that runs it
RUN_BY = {"single-sae-loss": "test_readme_kernels.py", "trainer-loss": "test_readme_kernels.py",
          "training-steps": "test_readme_kernels.py",
          "saelens-topk": "test_saelens_adapter.py"}
BACKENDS = ["reference", "cpu", "triton"]


def section_python_blocks() -> dict[str | None, tuple[str, int]]:
    """{name (None when unmarked): (code, README line of the fence)} for the section's ```python
    blocks; the section ends at the next ## or ### heading."""
    lines = README.read_text().splitlines()
    assert SECTION in lines, f"README.md has no heading {SECTION!r}"
    i, out, name = lines.index(SECTION) + 1, {}, None
    while i < len(lines) and not lines[i].startswith(("## ", "### ")):
        mark = _MARK.match(lines[i].strip())
        if mark:
            name = mark.group(1)
        elif lines[i].startswith("```python"):
            end = lines.index("```", i + 1)
            assert name not in out, f"README.md:{i + 1}: two python blocks named {name!r}"
            out[name] = ("\n".join(lines[i + 1:end]), i + 1)
            name, i = None, end
        elif lines[i].strip():
            name = None  # a marker names only the fence right after it (blank lines allowed)
        i += 1
    return out


def readme_python(name: str) -> str:
    """The code of the section's ```python block marked ``<!-- readme-python: NAME -->``."""
    blocks = section_python_blocks()
    assert name in blocks, f"README.md {SECTION!r} has no python block marked {name!r}"
    return blocks[name][0]


def exec_readme(name: str, namespace: dict) -> dict:
    """Run the named block in ``namespace`` (its file name in tracebacks: README.md:LINE)."""
    code, line = section_python_blocks()[name]
    exec(compile("\n" * line + code, str(README), "exec"), namespace)
    return namespace


def rel_err(got, want) -> float:
    return float((got.detach() - want.detach()).abs().max() / want.detach().abs().max().clamp_min(1e-30))


def test_every_python_block_of_the_section_is_run():
    blocks = section_python_blocks()
    assert None not in blocks, (f"README.md:{blocks[None][1]}: a python block in {SECTION!r} without "
                                "<!-- readme-python: NAME --> (no test runs it)")
    assert set(blocks) == set(RUN_BY), f"blocks {sorted(blocks)} != the ones the tests run {sorted(RUN_BY)}"


def tiny_sae(gen, B=29, D=24, F=70, k=6):
    """x [B, D] with a mean offset (so b_dec and fvu's centring matter), W_enc / W_dec [F, D]."""
    x = torch.randn(B, D, generator=gen) + 0.5
    W_enc = torch.randn(F, D, generator=gen) / D ** 0.5
    W_dec = torch.randn(F, D, generator=gen) / D ** 0.5
    b_enc = torch.randn(F, generator=gen) * 0.1
    b_dec = torch.randn(D, generator=gen) * 0.1
    return x, W_enc, b_enc, W_dec, b_dec, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_sae_loss_is_the_l2_loss_and_fvu(backend, monkeypatch):
    """The README block asserts mse / fvu / loss; here also every gradient against the plain-torch
    L2 loss on the dense decode. Measured worst max|err| / max|want| over mse, fvu and the
    gradients (vals, W_dec, b_dec): reference 1.6e-7, cpu 1.9e-7, triton 1.9e-7 (fp32 sums in
    another order); asserted <= 1e-6."""
    monkeypatch.setenv("FASTXC_BACKEND", backend)
    x, W_enc, b_enc, W_dec, b_dec, k = tiny_sae(torch.Generator().manual_seed(0))
    vals, idx = topk_encode(x - b_dec, W_enc, b_enc, k)
    vals = vals.detach().requires_grad_()
    W_dec.requires_grad_(), b_dec.requires_grad_()
    ns = exec_readme("single-sae-loss", dict(torch=torch, crosscoder_loss=crosscoder_loss, vals=vals,
                                             idx=idx, W_dec=W_dec, b_dec=b_dec, x=x))
    out = ns["out"]
    recon = to_dense(vals, idx, W_dec.shape[0]) @ W_dec + b_dec   # the dense decode, plain torch
    l2 = (recon - x).pow(2).sum(-1).mean()                       # SAELens / dictionary_learning
    fvu = (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()   # sparsify
    assert rel_err(out.mse[0], l2) <= 1e-6 and rel_err(out.fvu[0], fvu) <= 1e-6
    got = torch.autograd.grad(out.loss, (vals, W_dec, b_dec), retain_graph=True)
    want = torch.autograd.grad(l2, (vals, W_dec, b_dec), retain_graph=True)
    for name, g, w in zip(("vals", "W_dec", "b_dec"), got, want):
        assert rel_err(g, w) <= 1e-6, (name, rel_err(g, w))
    # fvu as a loss: its gradient is sparsify's FVU gradient
    for name, g, w in zip(("vals", "W_dec"), torch.autograd.grad(out.fvu[0], (vals, W_dec)),
                          torch.autograd.grad(fvu, (vals, W_dec))):
        assert rel_err(g, w) <= 1e-6, ("fvu", name, rel_err(g, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_encode_is_topk_then_relu(backend, monkeypatch):
    """Dense code and gradients of topk_encode = SAELens' TopK (top-k, then ReLU) = dictionary_
    learning's / sparsify's (ReLU, then top-k), on rows where fewer than k pre-activations are
    positive; the zero slots' indices are unspecified. Measured worst max|err| / max|want| over
    the code and the gradients (x, W_enc, b_enc): reference 0, cpu 1.3e-7, triton 6.3e-8;
    asserted <= 1e-6."""
    monkeypatch.setenv("FASTXC_BACKEND", backend)
    gen = torch.Generator().manual_seed(1)
    x, W_enc, _, _, _, k = tiny_sae(gen)
    b_enc = torch.randn(W_enc.shape[0], generator=gen) * 0.1 - 1.4   # 16 of 29 rows: fewer than k positive
    for t in (x, W_enc, b_enc):
        t.requires_grad_()
    pre = x @ W_enc.T + b_enc
    top = pre.topk(k, dim=-1, sorted=False)
    saelens = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    top_r = pre.relu().topk(k, dim=-1, sorted=False)
    dictlearn = torch.zeros_like(pre).scatter(-1, top_r.indices, top_r.values)
    assert torch.equal(saelens, dictlearn)
    vals, idx = topk_encode(x, W_enc, b_enc, k)
    code = to_dense(vals, idx, W_enc.shape[0])
    assert rel_err(code, saelens) <= 1e-6
    assert (vals >= 0).all() and ((idx >= -1) & (idx < W_enc.shape[0])).all()
    short = code_l0(vals) < k
    assert 10 <= short.sum() < len(short), "the case needs rows with fewer than k positive pre-activations"
    assert torch.equal(code_l0(vals), (saelens != 0).sum(-1))
    G = torch.randn(pre.shape, generator=gen)   # one upstream gradient on the dense code
    got = torch.autograd.grad((code * G).sum(), (x, W_enc, b_enc))
    want = torch.autograd.grad((saelens * G).sum(), (x, W_enc, b_enc))
    for name, g, w in zip(("x", "W_enc", "b_enc"), got, want):
        assert rel_err(g, w) <= 1e-6, (name, rel_err(g, w))


class AutoEncoderTopK(torch.nn.Module):
    """dictionary_learning's AutoEncoderTopK (trainers/top_k.py), its forward transcribed in plain
    torch: encoder = Linear(D, F), decoder = Linear(F, D, bias=False), b_dec [D], k a buffer."""

    def __init__(self, D: int, F: int, k: int, gen):
        super().__init__()
        self.encoder = torch.nn.Linear(D, F)
        self.decoder = torch.nn.Linear(F, D, bias=False)
        with torch.no_grad():
            self.encoder.weight.copy_(torch.randn(F, D, generator=gen) / D ** 0.5)
            self.encoder.bias.copy_(torch.randn(F, generator=gen) * 0.1 - 0.5)
            self.decoder.weight.copy_(torch.randn(D, F, generator=gen) / D ** 0.5)
        self.b_dec = torch.nn.Parameter(torch.randn(D, generator=gen) * 0.1)
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))

    def encode(self, x):
        post_relu = torch.nn.functional.relu(self.encoder(x - self.b_dec))
        top = post_relu.topk(int(self.k), sorted=False, dim=-1)
        return torch.zeros_like(post_relu).scatter_(-1, top.indices, top.values)

    def forward(self, x):
        return self.decoder(self.encode(x)) + self.b_dec


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainer_loss_block_is_dictionary_learnings_l2_loss(backend, monkeypatch):
    """The README's topk_l2_loss on dictionary_learning's module layout = TopKTrainer's L2 loss,
    (x - ae(x)).pow(2).sum(-1).mean(), and its gradients. Measured worst max|err| / max|want|
    over the loss, the code and the gradients: reference 1.2e-7, cpu 1.6e-7, triton 1.6e-7;
    asserted <= 1e-6."""
    monkeypatch.setenv("FASTXC_BACKEND", backend)
    gen = torch.Generator().manual_seed(2)
    ae = AutoEncoderTopK(24, 70, 6, gen)
    x = torch.randn(29, 24, generator=gen) + 0.5
    loss, vals, idx = exec_readme("trainer-loss", {})["topk_l2_loss"](ae, x)
    want = (x - ae(x)).pow(2).sum(-1).mean()
    assert rel_err(loss, want) <= 1e-6
    assert rel_err(to_dense(vals, idx, 70), ae.encode(x)) <= 1e-6
    params = list(ae.parameters())
    for p, g, w in zip(params, torch.autograd.grad(loss, params), torch.autograd.grad(want, params)):
        assert rel_err(g, w) <= 1e-6, (p.shape, rel_err(g, w))


def _planted(gen, n=2048, d=32, n_true=48, k_true=3):
    """Rows that are sums of k_true of n_true unit directions with positive weights."""
    dirs = torch.randn(n_true, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    pick = torch.rand(n, n_true, generator=gen).argsort(1)[:, :k_true]
    w = torch.zeros(n, n_true).scatter(1, pick, 0.5 + torch.rand(n, k_true, generator=gen))
    return w @ dirs, dirs


def test_training_steps_block_trains_topk_with_auxk_and_jumprelu():
    """The README's topk_step / jumprelu_step, 300 steps each on planted data (D 32, F 96): the
    loss falls (measured first / last-20 mean: topk 10.7x and 8.8x, jumprelu 17.4x and 22.6x on
    seeds 0 and 1; asserted > 4x), the decoder rows stay unit norm after every TopK step (the projection), and
    JumpReLU's thresholds move."""
    ns = exec_readme("training-steps", {})
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        x_all, _ = _planted(gen)
        for kind in ("topk", "jumprelu"):
            sae = torch.nn.Module()
            w = torch.randn(96, 32, generator=gen)
            w /= w.norm(dim=1, keepdim=True)
            sae.W_enc = torch.nn.Parameter(w.clone())
            sae.W_dec = torch.nn.Parameter(w.clone())
            sae.b_enc = torch.nn.Parameter(torch.zeros(96))
            sae.b_dec = torch.nn.Parameter(torch.zeros(32))
            if kind == "jumprelu":
                sae.log_threshold = torch.nn.Parameter(torch.full((96,), -2.3))
                theta0 = sae.log_threshold.detach().clone()
            opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
            last_fired = torch.zeros(96, dtype=torch.long)
            losses = []
            for step in range(300):
                x = x_all[torch.randint(0, x_all.shape[0], (128,), generator=gen)]
                if kind == "topk":
                    dead = (step - last_fired) > 20
                    losses.append(float(ns["topk_step"](sae, opt, x, 4, dead, k_aux=8)))
                    with torch.no_grad():
                        _, idx = ns["topk_encode"](x - sae.b_dec, sae.W_enc, sae.b_enc, 4)
                    last_fired[idx.unique()] = step
                    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-5)
                else:
                    losses.append(float(ns["jumprelu_step"](sae, opt, x)))
            first, last = losses[0], sum(losses[-20:]) / 20
            assert first / last > 4, (kind, seed, first, last)
            if kind == "jumprelu":
                assert (sae.log_threshold.detach() - theta0).abs().max() > 0.05
