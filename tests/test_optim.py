"""fastxc.core.optim.AdamInBackward: the same updates as torch's Adam, with no gradient kept."""
import copy

import pytest
import torch

from fastxc import Crosscoder
from fastxc.core.optim import AdamInBackward, adam


def _train(make_opt, steps=6, sd=None, compute_dtype=None):
    torch.manual_seed(1)
    m = Crosscoder([16, 12], 96, "topk", k=4, compute_dtype=compute_dtype)
    opt = make_opt(m.parameters())
    if sd is not None:
        opt.load_state_dict(sd)
    g = torch.Generator().manual_seed(2)
    for s in range(steps):
        x = torch.randn(33, 28, generator=g)
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (s + 1) / steps  # a schedule, as fastxc.train sets it
        opt.zero_grad(set_to_none=True)
        m(x).loss.backward()
        opt.step()
    return m, opt


@pytest.mark.parametrize("compute_dtype", [None, "bfloat16"])
def test_bit_identical_to_torch_adam_and_same_state_dict(compute_dtype):
    """Also under bf16 compute: the hooks sit on the fp32 masters, whose gradients arrive
    through the per-forward casts, and Adam's state stays fp32."""
    a, oa = _train(lambda p: AdamInBackward(p, lr=1e-2), compute_dtype=compute_dtype)
    b, ob = _train(lambda p: adam(p, lr=1e-2), compute_dtype=compute_dtype)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert p.grad is None, f"{name}: the gradient must be dropped inside backward"
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() == {0, 1, 2, 3}
    for i in sb["state"]:
        for k, v in sb["state"][i].items():
            assert torch.equal(sa["state"][i][k], v), (i, k)
            if k != "step":
                assert v.dtype == torch.float32, (i, k)


def test_resume_from_either_state_dict_continues_identically():
    _, ob = _train(lambda p: adam(p, lr=1e-2), steps=3)
    sd = ob.state_dict()  # torch's loader keeps these tensors and updates them in place: copy
    a, _ = _train(lambda p: AdamInBackward(p, lr=1e-2), steps=3, sd=copy.deepcopy(sd))
    b, _ = _train(lambda p: adam(p, lr=1e-2), steps=3, sd=copy.deepcopy(sd))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_remove_detaches_the_hooks():
    m = Crosscoder([8, 8], 32, "topk", k=2)
    opt = AdamInBackward(m.parameters(), lr=1e-2)
    opt.remove()
    before = [p.detach().clone() for p in m.parameters()]
    m(torch.randn(5, 16)).loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_bad_input():
    with pytest.raises(ValueError, match="no parameter"):
        AdamInBackward([torch.zeros(3)])
    m = Crosscoder([8, 8], 32, "topk", k=2)
    sd = adam([torch.nn.Parameter(torch.zeros(3))], lr=1e-3).state_dict()
    with pytest.raises(ValueError, match="1 parameters, this model 4"):
        AdamInBackward(m.parameters()).load_state_dict(sd)
