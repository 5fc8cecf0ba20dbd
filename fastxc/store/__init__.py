"""``python -m fastxc.store`` / ``fastxc store``: the command line over the activation store.

The store itself (format, writer, reader, checksums) is ``fastxc.data.store``; this package
holds only its command (``__main__.py``).
"""
