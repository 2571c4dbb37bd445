"""`--device auto`'s choice. MPS itself is untested (no Apple GPU here): only the choice is."""

import pytest
import torch

from tilevlm.device import resolve_device, resolve_dtype


def test_auto_picks_mps_where_torch_reports_it_and_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    device = resolve_device("auto")
    assert device.type == "mps" and resolve_dtype("auto", device) == torch.float32


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(None).type == "cpu"
    with pytest.raises(ValueError, match="no usable Apple MPS"):
        resolve_device("mps")
