"""``fastxc diff`` prints the NRN histogram of the live features, the ones diff.json and
nrn_hist.png count (issue #14 item 8: it used to print every feature, the dead ones piling up at
0.4-0.6)."""
from __future__ import annotations

import json
import re

import torch

from fastxc.core.crosscoder import Crosscoder
from fastxc.data.store import open_store, write_store

BAR = re.compile(r"^\s+(\d\.\d\d)-(\d\.\d\d) \|[# ]* (\d+)$")


def test_printed_histogram_counts_the_live_features(tmp_path, capsys):
    from fastxc.analysis.diff import main

    g = torch.Generator().manual_seed(0)
    reader = open_store(write_store(tmp_path / "store", torch.randn(600, 2, 12, generator=g), dtype="float32"))
    torch.manual_seed(0)
    cc = Crosscoder([12, 12], 48, activation="topk", k=4)
    with torch.no_grad():
        cc.b_enc[:20] = -100.0  # 20 features never fire: dead, their random decoders at NRN ~0.5
        cc.W_dec[20:30, :12] *= 0.02  # ten live features exclusive to source 1
        cc.input_scale.copy_(torch.as_tensor(reader.scales))
    cc.save(tmp_path / "cc")
    out = tmp_path / "out"
    assert main(["--crosscoder", str(tmp_path / "cc"), "--store", str(tmp_path / "store"), "--out", str(out),
                 "--device", "cpu", "--examples", "0"]) == 0
    bins = [m for m in map(BAR.match, capsys.readouterr().out.splitlines()) if m]
    summary = json.loads((out / "diff.json").read_text())
    counts = [int(m.group(3)) for m in bins]
    assert len(bins) == 10 and summary["live_features"] == 28  # 20 dead of 48
    assert sum(counts) == summary["live_features"]
    h20 = summary["nrn_histogram_20"]  # the JSON's 20 bins, pairwise, are the printed 10
    assert counts == [h20[2 * i] + h20[2 * i + 1] for i in range(10)]
    assert counts[-1] == 10
