"""Adam that steps each parameter inside backward, as soon as its gradient is complete.

Why: a crosscoder's two [F, D] weight gradients are as large as the weights; kept until
``optimizer.step()`` they cost 2 x [F, D] of memory on top of the parameters and Adam's moments.
Stepping each parameter from a post-accumulate-grad hook and dropping its gradient right away
means only one weight gradient is alive at a time, and with the kernels' buffer pool it reuses
the memory of the encoder's [B, F] pre-activation (``fastxc.kernels._pool``).

The update is torch's own Adam (fused where the device has the fused kernel), one instance per
parameter, so the result is bit-identical to ``torch.optim.Adam`` over all parameters (tested).
``state_dict()`` has the layout of that single optimizer, so checkpoints do not change.

Hooks run in the order they were registered: a model that averages gradients across ranks in
its own post-accumulate-grad hooks (``fastxc.train.data_parallel``) must register them
first, so that the step sees the averaged gradient.

    >>> opt = AdamInBackward(model.parameters(), lr=1e-4)
    >>> model(x).loss.backward()      # parameters are updated here; no .grad remains
    >>> opt.step()                     # no-op, kept for the usual loop shape
"""
from __future__ import annotations

from typing import Iterable

import torch


def adam(params, **kw) -> torch.optim.Adam:
    """torch Adam with the fused kernel where the device has it, else the foreach one."""
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, foreach=True, **kw)


class AdamInBackward:
    """Adam over ``params``, each updated by a hook the moment backward completes its gradient.

    ``param_groups`` lists one group per parameter (setting ``group["lr"]`` on each is how the
    learning-rate schedule reaches them); ``zero_grad``/``step`` are no-ops; ``remove()``
    detaches the hooks (afterwards backward leaves ``.grad`` as usual).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("AdamInBackward got no parameter that requires grad")
        self._opts = [adam([p], lr=lr, betas=betas, eps=eps) for p in self.params]
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(o)) for p, o in zip(self.params, self._opts)]

    @staticmethod
    def _hook(opt: torch.optim.Adam):
        def step(p: torch.Tensor) -> None:
            opt.step()
            p.grad = None  # its memory goes back to the pool before the next gradient is made

        return step

    @property
    def param_groups(self) -> list[dict]:
        return [o.param_groups[0] for o in self._opts]

    def step(self) -> None:
        """No-op: every parameter was stepped during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        """The state dict ``torch.optim.Adam(params)`` would give (one group, ids 0..n-1)."""
        state = {}
        for i, o in enumerate(self._opts):
            st = o.state_dict()["state"]
            if 0 in st:
                state[i] = st[0]
        group = {k: v for k, v in self._opts[0].state_dict()["param_groups"][0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, sd: dict) -> None:
        """Load a state dict of this class or of ``torch.optim.Adam`` over the same parameters."""
        groups = sd["param_groups"]
        ids = [i for g in groups for i in g["params"]]
        if len(ids) != len(self.params):
            raise ValueError(f"optimizer state has {len(ids)} parameters, this model {len(self.params)}")
        for pos, (o, pid) in enumerate(zip(self._opts, ids)):
            g = next(g for g in groups if pid in g["params"])
            one = {k: v for k, v in g.items() if k != "params"}
            # keep this instance's fused/foreach choice: the device decides it, not the file
            for k in ("fused", "foreach"):
                one[k] = o.param_groups[0].get(k)
            o.load_state_dict({"state": {0: sd["state"][pid]} if pid in sd["state"] else {},
                               "param_groups": [{**one, "params": [0]}]})
