"""The contract every fastxc command keeps with its user.

* Bad flags: one line ``error: ... (see --help)`` on stderr and exit status 2, no usage dump;
  flags are never abbreviated (``--n-feature`` is an error, not ``--n-features``), and an
  unknown flag is reported before any missing required one.
* ``--help`` gives every option a help line and shows its default (where it has one).
* Bad input found later (missing files, wrong shapes, corrupt stores): ``report(exc)`` prints
  one ``error: ...`` line and returns 2; ``FASTXC_DEBUG=1`` re-raises with the traceback.
"""
from __future__ import annotations

import argparse
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
