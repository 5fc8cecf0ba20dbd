"""The contract every fastxc command keeps with its user.

* Bad flags: one line ``error: ... (see --help)`` on stderr and exit status 2, no usage dump;
  flags are never abbreviated (``--n-feature`` is an error, not ``--n-features``).
* Bad input found later (missing files, wrong shapes, corrupt stores): ``report(exc)`` prints
  one ``error: ...`` line and returns 2; ``FASTXC_DEBUG=1`` re-raises with the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    """argparse with fastxc's error contract; ``--help`` shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # An unknown flag is the first thing to report: argparse would name the missing
        # required flags instead, which sends the user looking in the wrong place.
        argv = list(sys.argv[1:] if args is None else args)
        flags = argv[:argv.index("--")] if "--" in argv else argv
        unknown = [a for a in flags if a.startswith("--") and a.split("=", 1)[0] not in self._option_string_actions]
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
