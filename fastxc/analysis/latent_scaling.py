"""Latent scaling (Minder et al. 2025, arXiv 2504.02922): is a "model-exclusive" latent real, or
an artefact of the sparsity loss?

A latent whose decoder norm is (near) zero in model A (NRN -> 1) reads as "only in B". The L1
loss makes that claim unreliable in two ways: **complete shrinkage** (A has the concept too, but
its A-decoder was shrunk to zero, so A's reconstruction *error* still holds the direction) and
**latent decoupling** (A's *reconstruction* carries the direction through other latents). Latent
scaling measures both, per latent j, with one direction d_j (its decoder slice in the model it
leans to: B where NRN_j >= 0.5, else A; "ref" below, the other model is "other"):

    beta_m^y = argmin_b sum_x || b f_j(x) d_j - y_m(x) ||^2
             = sum_x f_j(x) <d_j, y_m(x)> / (||d_j||^2 sum_x f_j(x)^2)      (rows with f_j = 0 add 0)

for each model m in {A, B} and two targets y (store rows, in the crosscoder's normalised units):

    error           eps_m(x) = x_m - recon_m(x) + f_j(x) W_dec[j, m]   (j's own term put back)
    reconstruction  r_m(x)   = recon_m(x) - b_dec[m]                   (every latent, j included)

    nu_eps = beta_other^eps / beta_ref^eps      nu_r = beta_other^r / beta_ref^r

The targets are those of the authors' code (science-of-finetuning/sparsity-artifacts-crosscoders,
``tools/latent_scaler``; also in diffing-toolkit): the error with the latent's own contribution
added back, and the *full* reconstruction (so beta_ref^r ~ 1 and the ratio is stable), with one
deliberate difference: the decoder bias is left out of the reconstruction target. The bias is a
constant, not a concept; kept in, any component of b_dec along d_j is credited to the latent at
every row it fires on and can call a truly exclusive latent "decoupled" (test_latent_scaling has
the case).

Verdict of latent j (``verdicts``): "dead" if it never fired on the scanned rows; "shared" if
its NRN is not extreme (within [1 - exclusive_nrn, exclusive_nrn]: the decoder norms do not call
it exclusive, so there is nothing to check); otherwise "complete-shrinkage" if nu_eps >
NU_EPS_MAX, else "latent-decoupling" if nu_r > NU_R_MAX, else "exclusive" (it survives);
"undetermined" when the ref model's own beta is <= 0 (the ratio means nothing; it does not
survive either). The thresholds come from a planted sweep (test_latent_scaling.py,
``test_threshold_sweep``, noise from 2% to 25% of the concepts' amplitude): a planted exclusive
latent stays below 0.15 at every noise level, and one whose concept the other model holds with
at least half its strength (in its error or in its reconstruction) lands above 0.4; 0.3 sits
between. (At high noise the estimate shrinks towards 0 by up to ~20%: a ReLU latent also fires
on noise, and those rows add to sum f^2 but not to the numerator.)

Units: everything is in the crosscoder's normalised units (store rows scaled per source, as in
training), the units of the decoder norms that NRN is computed from; a concept of equal raw
strength in A and B gives nu = scale_A / scale_B, not 1, when the two sources' scales differ.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from fastxc.core.crosscoder import Crosscoder
from fastxc.core.norms import relative_norms

EXCLUSIVE_NRN = 0.9  # NRN above this (or below 1 - this) calls a latent model-exclusive
NU_EPS_MAX = 0.3  # above: the other model's error holds the direction (complete shrinkage)
NU_R_MAX = 0.3  # above: the other model's reconstruction holds it (latent decoupling)
VERDICTS = ("exclusive", "complete-shrinkage", "latent-decoupling", "undetermined", "shared", "dead")


class LatentScaling(NamedTuple):
    """Latent scaling of every latent. Index 0 of the [F, 2] betas is source a, 1 source b."""

    ref: Tensor  # [F] int64: 1 where d_j is the b-slice of the decoder (NRN >= 0.5 or NaN), 0: the a-slice
    beta_eps: Tensor  # [F, 2] float64: beta of each model's error (NaN where the latent never fired)
    beta_r: Tensor  # [F, 2] float64: beta of each model's reconstruction (bias excluded)
    nu_eps: Tensor  # [F] float64: beta_eps[other] / beta_eps[ref]
    nu_r: Tensor  # [F] float64: beta_r[other] / beta_r[ref]
    fired: Tensor  # [F] int64: scanned rows where the latent is active
    rows: int  # rows scanned


def _slice(model: Crosscoder, i: int) -> slice:
    return slice(model.offsets[i], model.offsets[i + 1])


def check_sources(model: Crosscoder, a: int = 0, b: int = 1) -> None:
    """ValueError (one line) unless a and b are two sources of ``model`` of equal width: one
    decoder direction is fitted to both models' activations."""
    for i in (a, b):
        if not 0 <= i < model.n_sources:
            raise ValueError(f"source index {i} out of range for a crosscoder with {model.n_sources} sources")
    if a == b:
        raise ValueError(f"latent scaling compares two different sources, got {a} twice")
    if model.widths[a] != model.widths[b]:
        raise ValueError(f"latent scaling needs equal widths (one decoder direction is fitted to both models), "
                         f"sources {a} and {b} have widths {model.widths[a]} and {model.widths[b]}")


@torch.no_grad()
def latent_scaling(model: Crosscoder, reader, a: int = 0, b: int = 1, ord: int = 1, n_rows: int | None = None,
                   batch_size: int = 2048, progress: bool = False) -> LatentScaling:
    """Stream the first ``n_rows`` store rows (all by default) in batches and fit the four betas of
    every latent (module docstring). Memory: a few [batch_size, F] tensors, never [N, F].

    Raises ValueError when sources a and b differ in width (one direction d_j is applied to both
    models' activations, so the method needs equal widths) or the store does not fit the model.
    """
    check_sources(model, a, b)
    if list(reader.widths) != list(model.widths):
        raise ValueError(f"crosscoder widths {model.widths} do not match the store's widths {list(reader.widths)}")
    n = len(reader) if n_rows is None else min(int(n_rows), len(reader))
    F, dev = model.n_features, model.W_enc.device
    W = model.W_dec.detach().float()
    dec = [W[:, _slice(model, a)], W[:, _slice(model, b)]]  # [F, d] per model
    bias = [model.b_dec.detach().float()[_slice(model, i)] for i in (a, b)]
    ref = torch.ones(F, dtype=torch.long, device=dev)
    ref[relative_norms(model, a, b, ord).nrn.to(dev) < 0.5] = 0  # NaN compares False: stays b
    d_ref = torch.where(ref.unsqueeze(1).bool(), dec[1], dec[0])  # [F, d]: d_j of every latent

    # sums over rows: f_j <d_j, eps_m - f_j W_dec[j, m]>, f_j <d_j, r_m>, f_j^2, firing count
    num_eps = torch.zeros(2, F, dtype=torch.float64, device=dev)
    num_r = torch.zeros(2, F, dtype=torch.float64, device=dev)
    s2 = torch.zeros(F, dtype=torch.float64, device=dev)
    fired = torch.zeros(F, dtype=torch.long, device=dev)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc="latent scaling", unit="row", unit_scale=True, disable=not progress, leave=False)
    try:
        for lo in range(0, n, batch_size):
            rows = np.arange(lo, min(lo + batch_size, n))
            x = model.flatten_input(reader.read_rows(rows).to(dev, model.W_enc.dtype))
            f = model.encode(x).float()  # [n, F]
            recon = model.decode(f.to(model.W_dec.dtype)).float()
            x = x.float()
            for m, i in enumerate((a, b)):
                s = _slice(model, i)
                # <d_j, y(x)> for every latent at once: one [n, d] @ [d, F] product per target
                num_eps[m] += (f * ((x[:, s] - recon[:, s]) @ d_ref.t())).sum(0).double()
                num_r[m] += (f * ((recon[:, s] - bias[m]) @ d_ref.t())).sum(0).double()
            s2 += (f * f).sum(0).double()
            fired += (f > 0).sum(0)
            bar.update(len(rows))
    finally:
        bar.close()
    # the error target puts j's own term back: + f_j W_dec[j, m], i.e. + <d_j, W_dec[j, m]> f_j^2
    for m in range(2):
        num_eps[m] += (d_ref * dec[m]).sum(1).double() * s2
    denom = d_ref.double().pow(2).sum(1) * s2
    denom = torch.where(denom > 0, denom, torch.full_like(denom, float("nan")))  # never fired: NaN
    beta_eps, beta_r = (num_eps / denom).t(), (num_r / denom).t()  # [F, 2]
    other = 1 - ref

    def ratio(beta: Tensor) -> Tensor:
        return beta.gather(1, other.unsqueeze(1)).squeeze(1) / beta.gather(1, ref.unsqueeze(1)).squeeze(1)

    return LatentScaling(ref.cpu(), beta_eps.cpu(), beta_r.cpu(), ratio(beta_eps).cpu(), ratio(beta_r).cpu(),
                         fired.cpu(), n)


def verdicts(ls: LatentScaling, nrn: Tensor, exclusive_nrn: float = EXCLUSIVE_NRN, nu_eps_max: float = NU_EPS_MAX,
             nu_r_max: float = NU_R_MAX) -> list[str]:
    """One of ``VERDICTS`` per latent (the module docstring gives the rules). ``nrn`` [F]."""
    if not 0.5 < exclusive_nrn < 1:
        raise ValueError(f"exclusive_nrn must lie in (0.5, 1), got {exclusive_nrn}")
    nrn = nrn.cpu()
    rows = torch.arange(len(nrn))
    beta_ref_eps, beta_ref_r = ls.beta_eps[rows, ls.ref], ls.beta_r[rows, ls.ref]
    out = []
    for j in range(len(nrn)):
        v = float(nrn[j])
        if ls.fired[j] == 0 or v != v:
            out.append("dead")
        elif 1 - exclusive_nrn <= v <= exclusive_nrn:
            out.append("shared")
        elif not (beta_ref_eps[j] > 0 and beta_ref_r[j] > 0):
            out.append("undetermined")
        elif ls.nu_eps[j] > nu_eps_max:
            out.append("complete-shrinkage")
        elif ls.nu_r[j] > nu_r_max:
            out.append("latent-decoupling")
        else:
            out.append("exclusive")
    return out


def summarize(verdict: Sequence[str], nrn: Tensor, names: Sequence[str], exclusive_nrn: float = EXCLUSIVE_NRN,
              nu_eps_max: float = NU_EPS_MAX, nu_r_max: float = NU_R_MAX, rows: int = 0) -> dict:
    """Counts of each verdict among the live latents exclusive to each model by NRN:
    {"only_b": {"candidates", "exclusive", "complete-shrinkage", ...}, "only_a": {...}, ...}."""
    nrn = nrn.cpu()
    side = {"only_b": nrn > exclusive_nrn, "only_a": nrn < 1 - exclusive_nrn}
    out = {"sources": list(names), "exclusive_nrn": exclusive_nrn, "nu_eps_max": nu_eps_max, "nu_r_max": nu_r_max,
           "rows_scanned": rows, "method": "Minder et al. 2025 (arXiv 2504.02922), latent scaling; "
                                           "fastxc.analysis.latent_scaling gives the definitions"}
    for key, mask in side.items():
        vs = [v for v, m in zip(verdict, mask.tolist()) if m and v != "dead"]
        out[key] = {"candidates": len(vs), **{k: vs.count(k) for k in VERDICTS[:4]}}
    return out


def finite_or_none(t: Tensor):
    """A tensor's values for JSON: a float (0-dim) or a list, with None for NaN and inf."""
    if t.dim() == 0:
        v = float(t)
        return v if np.isfinite(v) else None
    return [float(v) if np.isfinite(v) else None for v in t.tolist()]


def summary_lines(summary: dict) -> list[str]:
    """The printed report of ``summarize``'s dict: one line per model."""
    a, b = summary["sources"]
    m = summary["exclusive_nrn"]
    lines = []
    for key, cut, name in (("only_b", f"NRN > {m:g}", b), ("only_a", f"NRN < {1 - m:g}", a)):
        c = summary[key]
        lines.append(f"latent scaling: {c['exclusive']} of {c['candidates']} live features with {cut} survive "
                     f"(exclusive to {name}); {c['complete-shrinkage']} complete shrinkage, "
                     f"{c['latent-decoupling']} latent decoupling, {c['undetermined']} undetermined")
    return lines


def per_latent(ls: LatentScaling, verdict: Sequence[str], nrn: Tensor) -> dict:
    """Every latent's betas, ratios and verdict as JSON-ready lists (None where undefined)."""
    return {"nrn": finite_or_none(nrn.double()), "ref": ls.ref.tolist(), "fired": ls.fired.tolist(),
            "beta_eps_a": finite_or_none(ls.beta_eps[:, 0]), "beta_eps_b": finite_or_none(ls.beta_eps[:, 1]),
            "beta_r_a": finite_or_none(ls.beta_r[:, 0]), "beta_r_b": finite_or_none(ls.beta_r[:, 1]),
            "nu_eps": finite_or_none(ls.nu_eps), "nu_r": finite_or_none(ls.nu_r), "verdict": list(verdict)}


_COLOURS = {"exclusive": "#228833", "complete-shrinkage": "#ee6677", "latent-decoupling": "#4477aa",
            "undetermined": "#bbbbbb"}
_SHOWN = (-0.25, 1.5)  # plotted range of nu; values outside are drawn on its edge


def plot_latent_scaling(ls: LatentScaling, verdict: Sequence[str], nrn: Tensor, path, names: Sequence[str] = ("A", "B"),
                        exclusive_nrn: float = EXCLUSIVE_NRN, nu_eps_max: float = NU_EPS_MAX,
                        nu_r_max: float = NU_R_MAX):
    """nu_eps against nu_r of the latents exclusive by NRN, one panel per model, coloured by
    verdict, with the two thresholds dashed. PNG."""
    from fastxc.analysis.inputs import pyplot, savefig

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharex=True, sharey=True)
    nrn = nrn.cpu()
    panels = ((f"NRN > {exclusive_nrn:g}: only in {names[1]}?", nrn > exclusive_nrn, names[0], names[1]),
              (f"NRN < {1 - exclusive_nrn:g}: only in {names[0]}?", nrn < 1 - exclusive_nrn, names[1], names[0]))
    for ax, (title, mask, other, ref) in zip(axes, panels):
        idx = [j for j in torch.nonzero(mask).flatten().tolist() if verdict[j] != "dead"]
        for v, colour in _COLOURS.items():
            js = [j for j in idx if verdict[j] == v]
            if not js:
                continue
            xs = ls.nu_eps[js].nan_to_num(_SHOWN[1]).clamp(*_SHOWN).numpy()
            ys = ls.nu_r[js].nan_to_num(_SHOWN[1]).clamp(*_SHOWN).numpy()
            ax.scatter(xs, ys, s=14, alpha=0.75, color=colour, label=f"{v} ({len(js)})")
        ax.axvline(nu_eps_max, color="#666666", linestyle="--", linewidth=0.8)
        ax.axhline(nu_r_max, color="#666666", linestyle="--", linewidth=0.8)
        ax.set_xlim(_SHOWN[0] - 0.05, _SHOWN[1] + 0.05)
        ax.set_ylim(_SHOWN[0] - 0.05, _SHOWN[1] + 0.05)
        n_ex = sum(verdict[j] == "exclusive" for j in idx)
        ax.set_title(f"{title}  {n_ex} of {len(idx)} survive", fontsize=9)
        ax.set_xlabel(f"nu_eps = beta_eps({other}) / beta_eps({ref})  (complete shrinkage ->)")
        if idx:
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no live latents", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("nu_r = beta_r(other) / beta_r(ref)  (latent decoupling ->)")
    return savefig(fig, path, title=f"Latent scaling (Minder et al. 2025); values clipped to [{_SHOWN[0]}, {_SHOWN[1]}]")
