"""Export to SAELens and dictionary_learning and import back (``fastxc.interop``, ``python -m
fastxc.export``): same codes and reconstructions in the target library, exact round trips, and
refusals that write nothing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastxc import Crosscoder
from fastxc.cli import main as fastxc_main
from fastxc.export.__main__ import main as export_main
from fastxc.interop import InteropError, export_crosscoder, import_crosscoder

ROOT = Path(__file__).resolve().parents[1]


def _crosscoder(widths, activation, scale, k=6, n_features=64, seed=0) -> Crosscoder:
    """A small crosscoder with random weights, biases, input_scale and (batchtopk) threshold."""
    g = torch.Generator().manual_seed(seed)
    cc = Crosscoder(widths, n_features, activation, k=k, source_names=[f"m{i}" for i in range(len(widths))])
    cc.reset_parameters(g)
    with torch.no_grad():
        cc.W_enc.add_(torch.randn(cc.W_enc.shape, generator=g) * 0.05)  # encoder != decoder
        cc.b_enc.copy_(torch.randn(n_features, generator=g) * 0.1)
        cc.b_dec.copy_(torch.randn(cc.d_total, generator=g) * 0.3)
        cc.input_scale.copy_(torch.tensor(scale, dtype=torch.float32))
        if activation == "batchtopk":
            cc.threshold.fill_(0.05)
        cc.tokens_since_fired.copy_(torch.arange(n_features))
    return cc.eval()


def _fastxc_apply(cc: Crosscoder, x_raw: torch.Tensor):
    """(code [B, F], reconstruction of the raw input [B, D]) as fastxc computes them."""
    with torch.no_grad():
        out = cc(cc.normalize(x_raw))
        return out.code, cc.denormalize(out.recon)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _export(capsys, *argv):
    rc = export_main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_refused(rc, err, out: Path, *words):
    """One ``error:`` line naming the part, exit 2, nothing on disk (not even the parent)."""
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() and not out.parent.exists()


# --------------------------------------------------------------------------------------- SAELens
@pytest.mark.parametrize("activation,arch", [("relu", "standard"), ("topk", "topk"), ("batchtopk", "jumprelu")])
def test_saelens_export_loads_in_sae_lens_with_same_codes_and_reconstructions(tmp_path, capsys, activation, arch):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install 'fastxc[saelens]')")
    cc = _crosscoder([24], activation, [0.37])
    cc.save(tmp_path / "cc")
    rc, out, err = _export(capsys, "--crosscoder", tmp_path / "cc", "--to", "saelens", "--out", tmp_path / "sae",
                           "--hook-name", "blocks.2.hook_resid_pre")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]

    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    assert sae.cfg.architecture() == arch and sae.cfg.d_in == 24 and sae.cfg.d_sae == 64
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    x = torch.randn(256, 24, generator=torch.Generator().manual_seed(1)) * 3  # raw activations
    code, recon = _fastxc_apply(cc, x)
    with torch.no_grad():
        code_sl = sae.encode(x)
        recon_sl = sae.decode(code_sl)
        assert torch.equal(sae(x), recon_sl)
    # the same features fire in every row; values agree to float32 rounding (the input scale is
    # folded into SAELens's weights: x @ (s W) against (s x) @ W). Measured: codes <= 1.2e-7,
    # reconstructions <= 5.5e-7 (relu sums ~30 active features per row)
    assert torch.equal(code_sl != 0, code != 0)
    assert (code != 0).sum(1).float().mean() > 3
    assert _rel(code_sl, code) < 1e-6
    assert _rel(recon_sl, recon) < 2e-6

    # and back: the fastxc crosscoder again (the scale unfolded: within an ulp or two)
    rc, out, err = _export(capsys, "--from", "saelens", "--in", tmp_path / "sae", "--out", tmp_path / "back")
    assert rc == 0, err
    back = Crosscoder.load(tmp_path / "back")
    assert back.config() == cc.config()
    assert torch.equal(back.input_scale, cc.input_scale) and torch.equal(back.threshold, cc.threshold)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(back, name), getattr(cc, name), rtol=3e-7, atol=1e-7)
    code_b, recon_b = _fastxc_apply(back.eval(), x)
    assert torch.equal(code_b != 0, code != 0) and _rel(recon_b, recon) < 1e-6


def test_saelens_refuses_two_sources(tmp_path, capsys):
    _crosscoder([16, 16], "topk", [1.0, 1.0]).save(tmp_path / "cc")
    out = tmp_path / "new" / "sae"
    rc, _, err = _export(capsys, "--crosscoder", tmp_path / "cc", "--to", "saelens", "--out", out)
    _assert_refused(rc, err, out, "single-source", "2 sources")


def test_saelens_import_folds_b_dec_and_decoder_norm_rescaling(tmp_path):
    """A SAELens-trained topk SAE (apply_b_dec_to_input, rescale_acts_by_decoder_norm) imports
    as a fastxc crosscoder computing the same function; a per-feature JumpReLU is refused."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install 'fastxc[saelens]')")
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=20, d_sae=48, k=5, apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1) + 0.5)  # unequal decoder norms, so the rescaling matters
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    sae.save_model(tmp_path / "sl")
    cc = import_crosscoder("saelens", tmp_path / "sl").eval()
    assert cc.activation == "topk" and cc.k == 5 and cc.widths == [20]
    x = torch.randn(128, 20)
    with torch.no_grad():
        code_sl, out = sae.encode(x), cc(x)
        recon_sl = sae.decode(code_sl)
    assert torch.equal(code_sl != 0, out.code != 0)
    assert _rel(out.code, code_sl) < 1e-5 and _rel(out.recon, recon_sl) < 1e-5

    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    jr = JumpReLUSAE(JumpReLUSAEConfig(d_in=20, d_sae=48))
    with torch.no_grad():
        jr.threshold.copy_(torch.rand(48))
    jr.save_model(tmp_path / "jr")
    with pytest.raises(InteropError, match="thresholds differ between features"):
        import_crosscoder("saelens", tmp_path / "jr")


# ---------------------------------------------------------------------------- dictionary_learning
def _dl_forward(state: dict, x: torch.Tensor, code_normalization: str = "NONE"):
    """science-of-finetuning dictionary_learning's CrossCoder / BatchTopKCrossCoder forward at
    inference (dictionary.py: NormalizableMixin with keep_relative_variance, CrossCoderEncoder,
    CrossCoderDecoder, get_code_normalization, BatchTopKCrossCoder.encode with use_threshold),
    rebuilt from its state dict: x [B, L, d] raw -> (recon [B, L, d], scaled code [B, F])."""
    mean, scale = state["activation_mean"], state["activation_global_scale"]
    normalise = not (mean.isnan().any() or state["activation_std"].isnan().any())
    if normalise:
        x = (x - mean) * scale[None, :, None]
    f = torch.relu(torch.einsum("bld,ldf->blf", x, state["encoder.weight"]).sum(1) + state["encoder.bias"])
    dec = state["decoder.weight"]
    c = {"NONE": torch.tensor(1.0), "CROSSCODER": dec.norm(dim=2).sum(0, keepdim=True),
         "SAE": dec.norm(dim=(0, 2)).unsqueeze(0)}[code_normalization]
    if "threshold" in state:
        f = f * (f * c > state["threshold"])
    recon = torch.einsum("bf,lfd->bld", f, dec) + state["decoder.bias"]
    if normalise:
        recon = recon / (scale[None, :, None] + 1e-8) + mean
    return recon, f * c


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
@pytest.mark.parametrize("scale", [[1.0, 1.0], [0.05, 2.0]], ids=["no-normaliser", "scaled"])
def test_dictionary_learning_round_trip_is_bit_identical(tmp_path, capsys, activation, scale):
    cc = _crosscoder([16, 16], activation, scale)
    cc.save(tmp_path / "cc")
    rc, out, err = _export(capsys, "--crosscoder", tmp_path / "cc", "--to", "dictionary_learning", "--out", tmp_path / "dl")
    assert rc == 0 and err == "", err
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["config.json", "fastxc.json", "model.safetensors"]
    state = load_file(str(tmp_path / "dl" / "model.safetensors"))
    config = json.loads((tmp_path / "dl" / "config.json").read_text())
    assert config["code_normalization"] == "NONE" and config["num_layers"] == 2 and config["activation_dim"] == 16
    assert state["encoder.weight"].shape == (2, 16, 64) and state["decoder.weight"].shape == (2, 64, 16)
    assert int(state["code_normalization_id"]) == 4  # CodeNormalization.NONE
    assert ("threshold" in state) == (activation == "batchtopk") and ("k" in config) == (activation == "batchtopk")

    # dictionary_learning's forward on raw activations gives fastxc's codes and reconstructions
    # (measured against the real dictionary.py, commit 173f7fa: <= 2.3e-7 / 5.6e-7)
    x = torch.randn(256, 2, 16, generator=torch.Generator().manual_seed(2)) * 3
    code, recon = _fastxc_apply(cc, x)
    recon_dl, code_dl = _dl_forward(state, x)
    assert torch.equal(code_dl != 0, code != 0) and (code != 0).sum(1).float().mean() > 3
    assert _rel(code_dl, code) < 1e-6
    assert _rel(recon_dl, recon) < 2e-6

    # back to fastxc: every parameter and buffer bit-identical (the training-only dead-feature
    # counters start again from 0), and so the forward
    rc, out, err = _export(capsys, "--from", "dictionary_learning", "--in", tmp_path / "dl", "--out", tmp_path / "back")
    assert rc == 0, err
    back = Crosscoder.load(tmp_path / "back").eval()
    assert back.config() == cc.config()
    for name, t in cc.state_dict().items():
        if name != "tokens_since_fired":
            assert torch.equal(back.state_dict()[name], t), name
    assert not back.tokens_since_fired.any()
    code_b, recon_b = _fastxc_apply(back, x)
    assert torch.equal(code_b, code) and torch.equal(recon_b, recon)


def test_dictionary_learning_refuses_unequal_widths(tmp_path, capsys):
    _crosscoder([16, 24], "relu", [1.0, 1.0]).save(tmp_path / "cc")
    out = tmp_path / "new" / "dl"
    rc, _, err = _export(capsys, "--crosscoder", tmp_path / "cc", "--to", "dictionary_learning", "--out", out)
    _assert_refused(rc, err, out, "equal source widths", "[16, 24]")


def test_dictionary_learning_refuses_per_row_topk(tmp_path, capsys):
    _crosscoder([16, 16], "topk", [1.0, 1.0]).save(tmp_path / "cc")
    out = tmp_path / "new" / "dl"
    rc, _, err = _export(capsys, "--crosscoder", tmp_path / "cc", "--to", "dictionary_learning", "--out", out)
    _assert_refused(rc, err, out, "per-row TopK")


def test_dictionary_learning_import_of_a_trained_folder(tmp_path):
    """A dictionary_learning training folder (model_final.pt, config.json {"trainer": ...}) with a
    mean-shifting normaliser and CROSSCODER code normalisation imports as a fastxc crosscoder
    whose codes are dictionary_learning's scaled codes and whose reconstructions match."""
    g = torch.Generator().manual_seed(3)
    L, d, F = 2, 12, 40
    std = torch.rand(L, d, generator=g) + 0.5
    state = {
        "encoder.weight": torch.randn(L, d, F, generator=g) * 0.3,
        "encoder.bias": torch.randn(F, generator=g) * 0.1,
        "decoder.weight": torch.randn(L, F, d, generator=g) * 0.3,
        "decoder.bias": torch.randn(L, d, generator=g) * 0.3,
        "code_normalization_id": torch.tensor(1),  # CROSSCODER
        "target_rms": torch.tensor(1.0),
        "activation_mean": torch.randn(L, d, generator=g) * 0.5,
        "activation_std": std,
        "activation_global_scale": 1.0 / (std.pow(2).sum(-1) + 1e-8).sqrt(),
        "k": torch.tensor(5, dtype=torch.int32),
        "threshold": torch.tensor(0.4),
    }
    (tmp_path / "run").mkdir()
    torch.save(state, tmp_path / "run" / "model_final.pt")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKCrossCoder"}}))
    cc = import_crosscoder("dictionary_learning", tmp_path / "run").eval()
    assert cc.activation == "batchtopk" and cc.k == 5 and cc.widths == [d, d] and float(cc.threshold) == pytest.approx(0.4)
    x = torch.randn(200, L, d, generator=g) * 2
    code, recon = _fastxc_apply(cc, x)
    recon_dl, code_dl = _dl_forward(state, x, "CROSSCODER")
    assert torch.equal(code_dl != 0, code != 0) and (code != 0).any(1).all()
    assert _rel(code, code_dl) < 1e-5 and _rel(recon.view_as(recon_dl), recon_dl) < 1e-5

    state["code_normalization_id"] = torch.tensor(5)  # DECOUPLED: per-layer codes
    torch.save(state, tmp_path / "run" / "model_final.pt")
    with pytest.raises(InteropError, match="DECOUPLED"):
        import_crosscoder("dictionary_learning", tmp_path / "run")


# ----------------------------------------------------------------------------------- the command
def test_out_folder_is_not_overwritten_unless_asked(tmp_path, capsys):
    _crosscoder([16, 16], "relu", [1.0, 1.0]).save(tmp_path / "cc")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "keep.txt").write_text("mine")
    args = ["--crosscoder", tmp_path / "cc", "--to", "dictionary_learning", "--out", tmp_path / "dl"]
    rc, _, err = _export(capsys, *args)
    assert rc == 2 and err.startswith("error: ") and "not empty" in err
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["keep.txt"]
    rc, _, err = _export(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["config.json", "fastxc.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_bad_arguments_exit_2(tmp_path, capsys):
    for argv in (["--crosscoder", "x", "--out", "y"],                       # no --to
                 ["--crosscoder", "x", "--to", "saelens", "--from", "saelens", "--in", "z", "--out", "y"],
                 ["--crosscoder", "x", "--to", "onnx", "--out", "y"],
                 ["--crosscoder", "x", "--to", "dictionary_learning", "--hook-name", "h", "--out", "y"]):
        with pytest.raises(SystemExit) as e:
            export_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    rc, _, err = _export(capsys, "--crosscoder", tmp_path / "missing", "--to", "saelens", "--out", tmp_path / "o")
    assert rc == 2 and err.startswith("error: no crosscoder at") and not (tmp_path / "o").exists()
    rc, _, err = _export(capsys, "--from", "saelens", "--in", tmp_path, "--out", tmp_path / "o")
    assert rc == 2 and "cfg.json is missing" in err and not (tmp_path / "o").exists()


def test_fastxc_export_subcommand_and_module_entry(tmp_path):
    """``fastxc export`` dispatches to the command; ``python -m fastxc.export`` runs it."""
    _crosscoder([16, 16], "batchtopk", [0.5, 2.0]).save(tmp_path / "cc")
    assert fastxc_main(["export", "--crosscoder", str(tmp_path / "cc"), "--to", "dictionary_learning",
                        "--out", str(tmp_path / "a")]) == 0
    p = subprocess.run([sys.executable, "-m", "fastxc.export", "--crosscoder", str(tmp_path / "cc"), "--to", "saelens",
                        "--out", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: SAELens holds a single-source SAE"), p.stderr
    assert not (tmp_path / "b").exists()
    assert (tmp_path / "a" / "model.safetensors").is_file()


def test_library_refusal_writes_nothing(tmp_path):
    cc = _crosscoder([8], "batchtopk", [1.0])
    cc.threshold.fill_(-1.0)  # never trained: no inference threshold
    with pytest.raises(InteropError, match="no inference threshold"):
        export_crosscoder(cc, "saelens", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bf16_compute_is_exported_with_a_warning(tmp_path, capsys):
    """The targets compute in the weights' dtype (fp32): the closest equivalent, said so."""
    cc = _crosscoder([16, 16], "relu", [1.0, 1.0])
    cc.compute_dtype = torch.bfloat16
    cc.save(tmp_path / "cc")
    rc, out, err = _export(capsys, "--crosscoder", tmp_path / "cc", "--to", "dictionary_learning", "--out", tmp_path / "dl")
    assert rc == 0 and out.startswith("dictionary_learning: wrote ")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the crosscoder computes in bfloat16"), err
    back = import_crosscoder("dictionary_learning", tmp_path / "dl")
    assert back.compute_dtype == torch.bfloat16 and torch.equal(back.W_enc, cc.W_enc)


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_saved_and_exported_files_follow_the_umask(tmp_path, capsys, umask):
    """Crosscoder.save and the exporters write safetensors readable as the umask says
    (safetensors alone leaves every file 0600; fastxc.core.files.save_safetensors fixes it)."""
    import os

    cc = _crosscoder([16, 16], "relu", [1.0, 1.0])
    old = os.umask(umask)
    try:
        cc.save(tmp_path / "cc")
        rc, _, err = _export(capsys, "--crosscoder", tmp_path / "cc", "--to", "dictionary_learning",
                             "--out", tmp_path / "dl")
    finally:
        os.umask(old)
    assert rc == 0, err
    files = [p for d in ("cc", "dl") for p in (tmp_path / d).iterdir()]
    assert sum(p.suffix == ".safetensors" for p in files) == 2
    modes = {p.name + "@" + p.parent.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# --------------------------------------------------------------------------------------- jumprelu
def _jumprelu(widths, scale):
    """A jumprelu crosscoder with per-feature thresholds (between 0.05 and 0.5)."""
    cc = Crosscoder(widths, 64, "jumprelu", source_names=[f"m{i}" for i in range(len(widths))])
    g = torch.Generator().manual_seed(3)
    cc.reset_parameters(g)
    with torch.no_grad():
        cc.W_enc.add_(torch.randn(cc.W_enc.shape, generator=g) * 0.05)
        cc.b_enc.copy_(torch.randn(64, generator=g) * 0.1)
        cc.b_dec.copy_(torch.randn(cc.d_total, generator=g) * 0.3)
        cc.input_scale.copy_(torch.tensor(scale, dtype=torch.float32))
        cc.log_threshold.copy_(torch.empty(64).uniform_(0.05, 0.5, generator=g).log())
    return cc.eval()


def test_saelens_jumprelu_per_feature_thresholds_round_trip(tmp_path, capsys):
    cc = _jumprelu([24], [0.37])
    export_crosscoder(cc, "saelens", tmp_path / "sae")
    t = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    torch.testing.assert_close(t["threshold"], cc.log_threshold.detach().exp())
    x = torch.randn(256, 24, generator=torch.Generator().manual_seed(1)) * 3
    code, recon = _fastxc_apply(cc, x)
    assert (code != 0).sum(1).float().mean() > 3
    sae_lens = None
    try:
        import sae_lens
    except ImportError:
        pass
    if sae_lens is not None:  # SAELens's own jumprelu: the same code (measured as the test above)
        sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
        assert sae.cfg.architecture() == "jumprelu"
        with torch.no_grad():
            code_sl = sae.encode(x)
        assert torch.equal(code_sl != 0, code != 0) and _rel(code_sl, code) < 1e-6
    back = import_crosscoder("saelens", tmp_path / "sae")
    assert back.config() == cc.config()
    torch.testing.assert_close(back.log_threshold, cc.log_threshold, rtol=0, atol=1e-6)
    code_b, recon_b = _fastxc_apply(back.eval(), x)
    assert torch.equal(code_b != 0, code != 0) and _rel(recon_b, recon) < 1e-6


def test_dictionary_learning_refuses_jumprelu(tmp_path):
    with pytest.raises(InteropError, match="no per-feature thresholds"):
        export_crosscoder(_jumprelu([8, 8], [1.0, 1.0]), "dictionary_learning", tmp_path / "x")
    assert not (tmp_path / "x").exists()
