"""The contract every fastxc command keeps with its user.

* Bad flags: one line ``error: ... (see --help)`` on stderr and exit status 2, no usage dump;
  flags are never abbreviated (``--n-feature`` is an error, not ``--n-features``), and an
  unknown flag is reported before any missing required one.
* ``--help`` gives every option a help line and shows its default (where it has one).
* Bad input found later (missing files, wrong shapes, corrupt stores): ``report(exc)`` prints
  one ``error: ...`` line and returns 2; ``FASTXC_DEBUG=1`` re-raises with the traceback.
* A kernels-only install (``pip install fastxc``, no ``[all]``): every command stops before it
  starts with one ``error: ...`` line naming the missing packages and exit status 2
  (``require_full_install``; ``fastxc.cli.main`` and, for ``python -m``, ``fastxc/__init__.py``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys


def has_default(action: argparse.Action) -> bool:
    """Whether ``--help`` should show the action's default: not for None / suppressed ones, an
    on/off switch (its default is "off"), an empty string or list, or --help itself."""
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._StoreTrueAction,
                           argparse._StoreFalseAction, argparse._StoreConstAction)):
        return False
    return action.default is not None and action.default is not argparse.SUPPRESS and action.default not in ("", [])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default
    (``"(default: from the manifest)"``) or it has none worth showing (``has_default``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or not has_default(action):
            return text
        return f"{text} (default: %(default)s)"


def _is_flag(arg: str) -> bool:
    """``--name`` or ``-x``; not ``-``, ``--`` or a negative number list such as ``-1,2``."""
    return re.match(r"--?[A-Za-z]", arg) is not None


class Parser(argparse.ArgumentParser):
    """argparse with fastxc's error contract; ``--help`` shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # An unknown flag is the first thing to report: argparse would name the missing
        # required flags instead, which sends the user looking in the wrong place.
        argv = list(sys.argv[1:] if args is None else args)
        flags = argv[:argv.index("--")] if "--" in argv else argv
        unknown = [a for a in flags if _is_flag(a) and a.split("=", 1)[0] not in self._option_string_actions]
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_known_args(argv, namespace)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {message} (see --help)\n")


def report(exc: BaseException) -> int:
    """Print ``exc`` as one ``error: ...`` line and return exit code 2.

    With ``FASTXC_DEBUG`` set the exception is re-raised instead, traceback and all.
    """
    if os.environ.get("FASTXC_DEBUG"):
        raise exc
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    print(f"error: {msg}", file=sys.stderr)
    return 2


# pyproject.toml's `all` extra (triton aside: the commands run without it), as import name ->
# the name pip installs; tests/test_install.py keeps the two equal.
FULL_INSTALL = {
    "transformers": "transformers", "datasets": "datasets", "tokenizers": "tokenizers",
    "safetensors": "safetensors", "tqdm": "tqdm", "yaml": "PyYAML", "matplotlib": "matplotlib",
}


def missing_full_install() -> list[str]:
    """The packages of ``fastxc[all]`` that are not installed (pip names; empty when none).

    ``find_spec`` only looks for them, so checking costs no import.
    """
    missing = []
    for module, package in FULL_INSTALL.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install, or a module without __spec__
            found = False
        if not found:
            missing.append(package)
    return missing


def require_full_install(command: str) -> None:
    """Exit with status 2 and one ``error: ...`` line when ``command`` (e.g. "fastxc train")
    cannot run because the install is kernels-only; return when everything is there.

    Checked up front because most of the heavy imports are deferred: without the check a
    command could train for minutes and fail on its first save.
    """
    missing = missing_full_install()
    if missing:
        print(f"error: {command} needs {', '.join(missing)} (not installed: a kernels-only install of "
              f"fastxc leaves them out); install them with: pip install 'fastxc[all]'", file=sys.stderr)
        raise SystemExit(2)


# Python's short options that take no value (python --help); -W and -X take one, -c and -m end them
_FLAG_OPTIONS = set("bBdEhiIOPqRsSuvVx")


def dash_m_module(orig_argv: list[str]) -> str | None:
    """The MODULE of ``python [options] -m MODULE ...`` in the interpreter's ``orig_argv``, or
    None when it ran a script, ``-c`` or stdin."""
    i = 1
    while i < len(orig_argv):
        arg = orig_argv[i]
        i += 1
        if arg == "--check-hash-based-pycs":
            i += 1
            continue
        if not arg.startswith("-") or arg.startswith("--") or arg == "-":
            return None  # a script, stdin, or --help / --version
        for j in range(1, len(arg)):  # a cluster of short options: -u, -um, -Wignore, -mfoo
            if arg[j] == "m":
                return arg[j + 1:] or (orig_argv[i] if i < len(orig_argv) else None)
            if arg[j] in "WX":
                if j == len(arg) - 1:
                    i += 1  # "-W VALUE": the value is the next argument
                break
            if arg[j] not in _FLAG_OPTIONS:
                return None  # -c, or an option this parser does not know
    return None


def require_full_install_for_dash_m() -> None:
    """``require_full_install`` for ``python -m fastxc[.X]``, kernels (``fastxc.kernels.aot``) aside.

    Called from ``fastxc/__init__.py`` while ``sys.argv[0]`` is ``"-m"``: Python is still
    importing the packages of the module it was asked to run, so the check comes before any
    package of that command (``fastxc.train``'s imports included). A ``python -m`` of another
    program that imports fastxc is left alone.
    """
    module = dash_m_module(list(getattr(sys, "orig_argv", [])))
    if module is None or not (module == "fastxc" or module.startswith("fastxc.")):
        return
    if module == "fastxc.kernels" or module.startswith("fastxc.kernels."):
        return
    require_full_install(f"python -m {module}")
