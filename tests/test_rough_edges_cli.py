"""The command-line contract of every fastxc command (issue #16): no abbreviations, an unknown
flag named first, a help line and the default for every option; input files checked before
any work; eval warns about a fraction of loss recovered outside [0, 1]."""
from __future__ import annotations

import argparse
import importlib
import json

import pytest
import torch

from fastxc.cli import COMMANDS, build_parser
from fastxc.core.cli import Parser, has_default


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``fastxc NAME``: every command module exposes ``build_parser()``, so that its
    flags can be checked (a module without one fails here)."""
    return build_parser(name)


def _help_text(p: argparse.ArgumentParser, action: argparse.Action) -> str:
    return p._get_formatter()._expand_help(action)  # the option's help line as --help prints it


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_keeps_the_flag_contract(name, capsys):
    p = command_parser(name)
    assert isinstance(p, Parser) and p.allow_abbrev is False, f"{name}: not fastxc.core.cli.Parser"
    longs = []
    for action in p._actions:
        flags = "/".join(action.option_strings) or action.dest
        assert action.help and action.help is not argparse.SUPPRESS, f"fastxc {name} {flags}: no help line"
        text = _help_text(p, action)
        if has_default(action):
            assert "default" in text.lower() and str(action.default) in text, \
                f"fastxc {name} {flags}: --help does not show the default {action.default!r}: {text!r}"
        longs += [o for o in action.option_strings if o.startswith("--") and len(o) > 4]
    p.format_help()  # renders (a bad %-format in a help string raises here)

    # an unknown flag is the one error reported, before any missing required flag
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: unrecognized arguments: --bogus") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        p.parse_args(["-Z"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: unrecognized arguments: -Z"), err

    # no abbreviations: the longest flag cut short is unknown, not taken for the flag
    if longs:
        flag = max(longs, key=len)
        abbrev = flag[:-2]
        assert abbrev not in p._option_string_actions
        with pytest.raises(SystemExit) as e:
            p.parse_args([abbrev, "1"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"unrecognized arguments: {abbrev}" in err, (flag, err)


def test_console_script_rejects_unknown_commands_and_flags(capsys):
    from fastxc.cli import main

    assert main(["--bogus"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown command '--bogus'")
    with pytest.raises(SystemExit) as e:
        main(["diff", "--crosscoder", "x", "--bogus"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: unrecognized arguments: --bogus")


def test_help_shows_defaults_once(capsys):
    """A default shown by the help text itself is not appended a second time."""
    from fastxc.data.harvest import build_parser

    text = build_parser().format_help()
    assert text.count("default: text") == 1  # --text-field
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text


# ------------------------------------------------------------- input paths checked before any work
@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a crosscoder, store, model, tokenizer or config is loaded."""
    from fastxc.analysis import inputs
    from fastxc.core.crosscoder import Crosscoder
    from fastxc.data import models, store

    def boom(*a, **k):
        raise AssertionError("something was loaded before the input paths were checked")

    monkeypatch.setattr(Crosscoder, "load", boom)
    monkeypatch.setattr(store, "open_store", boom)
    for mod in (inputs, models):
        for fn in ("load_model", "load_tokenizer", "load_config"):
            monkeypatch.setattr(mod, fn, boom)


@pytest.mark.parametrize("command,flag,kind", [
    ("steer", "--prompts", "file"), ("eval", "--data", "file"), ("eval", "--eval-store", "folder"),
    ("reasoning", "--categories", "file"), ("ablate", "--categories", "file"), ("geometry", "--pairs", "file"),
    ("diff", "--store", "folder"), ("diff", "--crosscoder", "folder"),
])
def test_missing_input_fails_at_once_naming_it(tmp_path, capsys, no_loading, command, flag, kind):
    cc, st = tmp_path / "cc", tmp_path / "store"
    cc.mkdir()
    (cc / "config.json").write_text("{}")
    st.mkdir()
    missing = tmp_path / ("missing.txt" if kind == "file" else "missing-dir")
    args = {"--crosscoder": str(cc), "--store": str(st), flag: str(missing)}
    if command == "steer":
        args["--feature"] = "1"
    argv = [a for kv in args.items() for a in kv] + ["--device", "cpu", "--out", str(tmp_path / "out")]
    module = importlib.import_module(COMMANDS[command][0])
    rc = module.main(argv)  # the no_loading guard fails the test if any model or store is loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {flag}: no such") and str(missing) in err[0], err
    assert not (tmp_path / "out").exists()


def test_training_run_folder_given_as_crosscoder_is_named(tmp_path, capsys, no_loading):
    from fastxc.analysis.diff import main

    (tmp_path / "run" / "crosscoder").mkdir(parents=True)
    (tmp_path / "run" / "crosscoder" / "config.json").write_text("{}")
    assert main(["--crosscoder", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is a training run" in err and str(tmp_path / "run" / "crosscoder") in err


def test_prompts_read_before_the_models_load(tmp_path, capsys, monkeypatch):
    """A prompts file that exists but is not UTF-8 is reported (file and line) before any model
    is loaded: the crosscoder and store open, the models never do."""
    from fastxc.analysis import inputs
    from fastxc.analysis.steer import main

    from test_analysis import identity_crosscoder

    cc = identity_crosscoder([4, 4])
    cc.save(tmp_path / "cc")
    monkeypatch.setattr(inputs.Inputs, "models", lambda self: pytest.fail("models loaded before the prompts were read"))
    (tmp_path / "p.txt").write_bytes(b"what is two plus two\nthe \xff answer\n")
    rc = main(["--crosscoder", str(tmp_path / "cc"), "--prompts", str(tmp_path / "p.txt"), "--feature", "1",
               "--alpha-unit", "raw", "--device", "cpu", "--model-a", "a", "--model-b", "b", "--layer", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / 'p.txt'}:2: not valid UTF-8 (byte 0xff at column 5)" in err, err


# ---------------------------------------------------------------------- eval: a fraction outside [0, 1]
def test_frac_warnings():
    from fastxc.analysis.evaluate import SpliceResult, frac_warnings

    res = SpliceResult(clean=[2.0, 2.0, 2.0, 2.0], spliced=[2.5, 5.0, 1.0, 3.0], zero=[4.0, 4.0, 4.0, 2.0],
                       frac_recovered=[0.75, -0.5, 1.5, float("nan")], n_tokens=10)
    w = frac_warnings(["ok", "worse", "better", "flat"], res)
    assert len(w) == 3
    assert w[0].startswith("worse: fraction of loss recovered -0.5000 is below 0")
    assert w[1].startswith("better: fraction of loss recovered 1.5000 is above 1")
    assert w[2].startswith("flat:") and "undefined" in w[2]


def test_eval_warns_when_frac_recovered_is_out_of_range(tmp_path, capsys):
    """A crosscoder whose reconstruction is far off (the identity crosscoder's decoder times
    -50) loses more than zero-ablation: eval.json flags it and stderr has a warning line."""
    from fastxc.analysis.evaluate import main

    from test_analysis import identity_crosscoder, shared_world

    w = shared_world()
    cc = identity_crosscoder([16, 16], w["reader"].scales)
    with torch.no_grad():
        cc.W_dec.mul_(-50.0)
    cc.save(tmp_path / "cc")
    rc = main(["--crosscoder", str(tmp_path / "cc"), "--store", str(w["store"]), "--out", str(tmp_path / "e"),
               "--n-sequences", "6", "--context", "8", "--metric-rows", "64", "--device", "cpu"])
    assert rc == 0
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    # (on these tiny models the base one still recovers a little; the distilled one goes below 0)
    frac = res["frac_recovered"]
    assert 0 <= frac[0] <= 1 and frac[1] < 0 and res["frac_recovered_in_range"] == [True, False]
    assert len(res["warnings"]) == 1 and res["warnings"][0].startswith("distilled: fraction of loss recovered")
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]
    assert err == [f"warning: {res['warnings'][0]}"] and "is below 0" in err[0], err
