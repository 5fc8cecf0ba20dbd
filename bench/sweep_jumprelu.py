"""Sweep of the jumprelu defaults (``--l0-coef``, ``--jumprelu-bandwidth``,
``--jumprelu-init-threshold``) on the planted synthetic source, over several seeds.

    OMP_NUM_THREADS=1 python bench/sweep_jumprelu.py                 # the grid below, seeds 0 1
    OMP_NUM_THREADS=1 python bench/sweep_jumprelu.py --seeds 0 1 2 --l0 0.01 --bw 0.05 --init 0.05

Each run is the recovery setting of tests/test_train.py (two 64-wide sources, 32 shared + 32
only-A + 32 only-B planted features, F = 256, 1500 steps of 512 rows) with --activation
jumprelu. Printed per setting, worst over the seeds: MMCS (mean over planted features of the
best decoder cosine), the fraction of planted features recovered at cosine >= 0.9, the fraction
in the right NRN class, max FVU, and the mean L0 (the planted source fires ~4.7 features a row).

Defaults were picked from the settings where every seed recovers >= 0.9 at MMCS >= 0.9 with
the lowest L0 that keeps FVU low, preferring the middle of the good region over its edge (a
default is never tuned to pass one test). Measured on CPU, seeds 0 1 (worst of the two):

     lrx  l0_coef     bw   init |   mmcs  recov  class     fvu     l0
       1     0.01   0.05    0.1 |  0.849  0.458  0.760  0.0029  19.50
       1     0.01   0.05    0.3 |  0.592  0.125  0.375  0.2757  13.75
       1     0.01   0.05    0.5 |  0.650  0.333  0.333  1.0004   0.00
       1     0.03   0.05    0.1 |  0.857  0.490  0.760  0.0030  17.57
      10     0.01   0.05    0.1 |  0.946  0.833  0.958  0.0029   8.57
      10     0.03   0.05    0.1 |  0.981  0.958  1.000  0.0031   5.12
      10     0.03    0.2    0.1 |  0.998  1.000  1.000  0.0034   3.81   <- defaults
      10     0.03    0.2   0.03 |  0.997  1.000  1.000  0.0036   3.83

(lrx: --jumprelu-threshold-lr-scale. At 1 the log-thresholds move too slowly at lr 1e-3 to
reach the code's scale in 1500 steps, whatever their init.)
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time

import torch


def run(seed: int, l0: float, bw: float, init: float, steps: int, lr_scale: float) -> dict:
    from fastxc.data.synthetic import recovery
    from fastxc.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(source="synthetic", widths="64,64", out=out, activation="jumprelu", n_features=256,
                          steps=steps, batch_size=512, progress=False, log_every=steps, checkpoint_every=0, seed=seed,
                          l0_coef=l0, jumprelu_bandwidth=bw, jumprelu_init_threshold=init,
                          jumprelu_threshold_lr_scale=lr_scale)
        res = train(cfg)
        from fastxc.data.synthetic import PlantedSource

        cos = recovery(res.model.W_dec, PlantedSource([64, 64], seed=seed).truth)
        s = res.summary
        return {"mmcs": float(cos.mean()), "recovered": float((cos >= 0.9).float().mean()),
                "right_class": s.get("planted_right_class", float("nan")), "fvu": max(s["fvu"]), "l0": s["l0"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--l0", type=float, nargs="+", default=[0.003, 0.01, 0.03])
    p.add_argument("--bw", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    p.add_argument("--init", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--lr-scale", type=float, nargs="+", default=[10.0])
    p.add_argument("--steps", type=int, default=1500)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'lrx':>4} {'l0_coef':>8} {'bw':>6} {'init':>6} | {'mmcs':>6} {'recov':>6} {'class':>6} {'fvu':>7} {'l0':>6}  (worst of seeds {a.seeds})")
    for lrx, l0, bw, init in itertools.product(a.lr_scale, a.l0, a.bw, a.init):
        t = time.perf_counter()
        rs = [run(s, l0, bw, init, a.steps, lrx) for s in a.seeds]
        worst = {k: (max if k in ("fvu", "l0") else min)(r[k] for r in rs) for k in rs[0]}
        print(f"{lrx:4.3g} {l0:8.3g} {bw:6.3g} {init:6.3g} | {worst['mmcs']:6.3f} {worst['recovered']:6.3f} "
              f"{worst['right_class']:6.3f} {worst['fvu']:7.4f} {worst['l0']:6.2f}  ({time.perf_counter() - t:.0f} s)",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
