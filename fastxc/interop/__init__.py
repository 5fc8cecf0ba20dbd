"""Export a fastxc crosscoder to other libraries' on-disk formats, and import it back.

    from fastxc.interop import export_crosscoder, import_crosscoder
    export_crosscoder("runs/x/crosscoder", "dictionary_learning", "exported/")   # or "saelens"
    cc = import_crosscoder("dictionary_learning", "exported/")                  # a fastxc Crosscoder

``saelens``: a single-source SAE folder (``cfg.json`` + ``sae_weights.safetensors``) that
``sae_lens.SAE.load_from_disk`` reads; ``dictionary_learning``: the state dict and hub config of
science-of-finetuning's ``CrossCoder`` / ``BatchTopKCrossCoder``. A model the target cannot
express raises ``InteropError`` saying which part, before anything is written. The command
line is ``python -m fastxc.export`` (``fastxc export``).
"""
from fastxc.interop.convert import (FORMATS, InteropError, InteropWarning, export_crosscoder, import_crosscoder,
                                    import_to_folder)

__all__ = ["FORMATS", "InteropError", "InteropWarning", "export_crosscoder", "import_crosscoder", "import_to_folder"]
