"""How much the on-the-fly shuffle buffer decorrelates batches, against a shuffled store.

    python bench/buffer_correlation.py 4096      # the --buffer-rows to measure

Two tiny random Llama models (tests/test_harvest.py's builders) harvest 40000 rows of long
documents (60-400 words, context 64); batches of 256 are drawn from an ``OnTheFlySource`` with
the given buffer, and from a store of the same rows. Prints, for each: the fraction of a batch's
rows whose document also has a row in the previous batch, and the chance that another row of the
same batch comes from the same document.
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_harvest import WORDS_A, WORDS_B, model_pair  # noqa: E402

from fastxc.data.buffer import OnTheFlySource  # noqa: E402
from fastxc.data.harvest import harvest, iter_activations, plan_harvest  # noqa: E402
from fastxc.data.store import open_store  # noqa: E402

N, B, CL = 40000, 256, 64


def shared_with_previous(batches) -> float:
    return float(np.mean([np.isin(b1, b0).mean() for b0, b1 in zip(batches, batches[1:])]))


def same_document_pairs(batches) -> float:
    return float(np.mean([np.mean([(np.sum(np.array(b) == d) - 1) / (len(b) - 1) for d in b])
                          for b in batches[:40]]))


def main(buffer_rows: int) -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="buffer-corr-"))
    pair = model_pair(root)
    rng = np.random.default_rng(0)
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(600):
            words = rng.choice(WORDS_A + WORDS_B, size=int(rng.integers(60, 400)))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    models, data = [pair["a"], pair["b"]], [str(root / "docs.jsonl")]
    plan = plan_harvest(models, data, N, context_length=CL, batch_size=8)
    src = OnTheFlySource(plan, "cpu", buffer_rows=buffer_rows, tokens=N)
    docs = {}
    for item in iter_activations(plan, src.caps, "cpu"):
        for r, d in enumerate(item.meta["doc"]):
            docs[(item.index, r)] = int(d)
        if len(docs) > N:
            break
    it = src.stream(B, seed=0, scales=[1.0, 1.0])
    buffered = []
    for _ in range(N // B - 2):
        next(it)
        buffered.append([docs[tuple(x)] for x in it.last_ids.tolist()])
    it.close()
    harvest(models, root / "store", data, N, context_length=CL, batch_size=8, progress=False)
    st = open_store(root / "store")
    doc = st.meta("doc")
    stored = [doc[st.batch_rows(B, 0, i)].tolist() for i in range(N // B - 2)]
    print(f"buffer of {buffer_rows} rows: {shared_with_previous(buffered):.3f} of a batch's rows share a document "
          f"with the previous batch (store {shared_with_previous(stored):.3f}); same-document pairs within a "
          f"batch {same_document_pairs(buffered):.4f} (store {same_document_pairs(stored):.4f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
