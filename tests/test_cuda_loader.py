"""The _C loader: clear errors when the extension is missing, error-code conversion, the fill launcher."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from reprokernels import _cuda


@pytest.fixture
def fresh_loader():
    _cuda._load.cache_clear()
    _cuda._device_status.cache_clear()
    yield
    _cuda._load.cache_clear()
    _cuda._device_status.cache_clear()


def test_missing_extension_explains_build_and_rebuild(fresh_loader, monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *args):
        if name == "reprokernels._C":
            raise ImportError("No module named 'reprokernels._C'")
        return real_import(name, *args)

    monkeypatch.setattr(_cuda.importlib, "import_module", fake_import)
    monkeypatch.setattr(_cuda, "build_info", lambda: {"cuda_build": True, "archs": ["80", "90"], "nvcc": "13.0"})
    assert not _cuda.extension_built()
    assert not _cuda.cuda_available()
    with pytest.raises(_cuda.CudaUnavailableError) as err:
        _cuda.extension()
    msg = str(err.value)
    assert "No module named 'reprokernels._C'" in msg
    assert "built with nvcc 13.0 for sm_80, sm_90" in msg
    assert "REPROKERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation" in msg
    assert _cuda.runtime_version() is None


def test_skipped_build_is_described(fresh_loader, monkeypatch):
    monkeypatch.setattr(_cuda.importlib, "import_module", lambda *a: (_ for _ in ()).throw(ImportError("gone")))
    record = {"cuda_build": False, "reason": "skipped: REPROKERNELS_BUILD_CUDA=0"}
    monkeypatch.setattr(_cuda, "build_info", lambda: record)
    assert "skipped: REPROKERNELS_BUILD_CUDA=0" in _cuda.unavailable_reason()


def test_no_device_is_reported_not_raised(fresh_loader, monkeypatch):
    fake = types.SimpleNamespace(device_count=lambda: -35, error_string=lambda c: "driver too old")
    monkeypatch.setattr(_cuda.importlib, "import_module", lambda *a: fake)
    assert not _cuda.cuda_available()
    assert "driver too old" in _cuda.unavailable_reason()


def test_nonzero_launch_code_becomes_runtime_error(fresh_loader, monkeypatch):
    fake = types.SimpleNamespace(error_string=lambda c: {98: "invalid device function"}[c])
    monkeypatch.setattr(_cuda.importlib, "import_module", lambda *a: fake)
    _cuda.check(0, "some_kernel")  # success is silent
    with pytest.raises(RuntimeError, match=r"kernel 'some_kernel' failed: invalid device function \(code 98\)"):
        _cuda.check(98, "some_kernel")


@pytest.mark.skipif(not _cuda.extension_built(), reason="reprokernels._C is not built")
def test_built_extension_answers_without_a_device():
    ext = _cuda.extension()
    assert ext.cuda_runtime_version() > 0
    n = ext.device_count()  # 0 or a negative error code on a machine without a GPU, never a crash
    assert isinstance(n, int)
    assert isinstance(ext.error_string(1), str)


@pytest.mark.gpu
def test_fill_kernel_end_to_end():
    if not _cuda.cuda_available():
        pytest.skip(_cuda.unavailable_reason())
    t = torch.full((1000003,), float("nan"), device="cuda")
    _cuda.fill_(t, 2.5)
    torch.cuda.synchronize()
    assert bool((t == 2.5).all())
