"""How every fastxc command reports bad input: one ``error: ...`` line on stderr."""
from __future__ import annotations

import os
import sys


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
