"""--device: auto by default in train, harvest and the analysis commands (fastxc.core.device), and
a device that cannot be used is one ``error: ...`` line."""
import pytest
import torch

from fastxc.core.device import DeviceError, resolve_device


def test_resolve_device():
    want = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == resolve_device(" AUTO ") == want
    assert resolve_device("cpu") == resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(DeviceError, match="is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device is available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(DeviceError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def _one_line(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_harvest_and_analysis_default_to_auto_and_refuse_bad_devices(tmp_path, capsys):
    from fastxc.analysis import inputs
    from fastxc.analysis.diff import main as diff_main
    from fastxc.data import harvest

    assert harvest.build_parser().parse_args(["--tokens", "1", "--out", "x"]).device == "auto"
    assert inputs.parser("p", "d").parse_args(["--crosscoder", "c"]).device == "auto"
    line = _one_line(capsys, harvest.main(["--model-a", "m", "--model-b", "n", "--dataset", "d.txt", "--tokens", "10",
                                           "--out", str(tmp_path / "s"), "--device", "bogus"]))
    assert "--device 'bogus' is not a device" in line
    assert not (tmp_path / "s").exists()
    line = _one_line(capsys, diff_main(["--crosscoder", str(tmp_path / "cc"), "--device", "bogus"]))
    assert "--device 'bogus' is not a device" in line
