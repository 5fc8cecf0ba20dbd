"""``python -m fastxc.export`` / ``fastxc export``: the command line over ``fastxc.interop``.

This package holds only the command (``__main__.py``); the conversions are ``fastxc.interop``.
"""
