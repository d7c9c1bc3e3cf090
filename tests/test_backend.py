"""Backend selection rules, the environment default, use_backend, and explicit-backend errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import reprokernels
from reprokernels import _backend
from reprokernels._backend import BackendUnavailableError, resolve_backend

CPU = torch.device("cpu")


@pytest.fixture
def ops():
    saved = dict(_backend._OPS)
    _backend.register_op("_t_plain", ("reference", "triton", "cuda"))
    _backend.register_op("_t_attn", ("reference", "composite", "triton"))
    _backend.register_op("_t_refonly", ("reference",))
    yield
    _backend._OPS.clear()
    _backend._OPS.update(saved)


def test_auto_on_cpu_is_reference_or_composite(ops):
    assert resolve_backend("_t_plain", "auto", CPU) == "reference"
    assert resolve_backend("_t_attn", "auto", CPU) == "composite"


def test_auto_on_cuda_prefers_cuda_then_triton(ops, monkeypatch):
    status = {"cuda": (True, ""), "triton": (True, "")}
    monkeypatch.setattr(_backend, "backend_status", lambda b, d: status.get(b, (True, "")))
    cuda = torch.device("cuda")
    assert resolve_backend("_t_plain", "auto", cuda) == "cuda"
    assert resolve_backend("_t_attn", "auto", cuda) == "triton"  # no CUDA kernel for this op
    status["cuda"] = (False, "not built")
    assert resolve_backend("_t_plain", "auto", cuda) == "triton"
    status["triton"] = (False, "not installed")
    assert resolve_backend("_t_plain", "auto", cuda) == "reference"


def test_explicit_cuda_on_cpu_tensors_raises(ops):
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run _t_plain: .*CUDA tensors, got cpu"):
        resolve_backend("_t_plain", "cuda", CPU)


def test_explicit_triton_on_cpu_needs_the_interpreter(ops, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_backend("_t_plain", "triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _backend.triton_installed():
        assert resolve_backend("_t_plain", "triton", CPU) == "triton"


def test_backend_the_op_lacks_raises(ops):
    with pytest.raises(BackendUnavailableError, match=r"_t_refonly has no 'composite' backend \(it has: reference\)"):
        resolve_backend("_t_refonly", "composite", CPU)


def test_unknown_backend_name_raises(ops):
    with pytest.raises(ValueError, match="backend: expected one of auto, reference"):
        resolve_backend("_t_plain", "fast", CPU)


def test_use_backend_sets_and_restores_the_default(ops):
    assert reprokernels.default_backend() == "auto"
    with reprokernels.use_backend("reference"):
        assert resolve_backend("_t_attn", "auto", CPU) == "reference"
        with reprokernels.use_backend("composite"):
            assert resolve_backend("_t_attn", "auto", CPU) == "composite"
        assert reprokernels.default_backend() == "reference"
        # an explicit argument wins over the context
        assert resolve_backend("_t_attn", "composite", CPU) == "composite"
    assert reprokernels.default_backend() == "auto"
    with pytest.raises(ValueError, match="use_backend: expected one of"):
        with reprokernels.use_backend("gpu"):
            pass


def test_use_backend_does_not_fall_back(ops):
    with reprokernels.use_backend("cuda"), pytest.raises(BackendUnavailableError):
        resolve_backend("_t_plain", "auto", CPU)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env)


def test_environment_variable_sets_the_default():
    proc = _python("import reprokernels; print(reprokernels.default_backend())", REPROKERNELS_BACKEND="reference")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference"


def test_bad_environment_variable_is_a_clear_error():
    proc = _python("import reprokernels", REPROKERNELS_BACKEND="fastest")
    assert proc.returncode != 0
    want = "REPROKERNELS_BACKEND: expected one of auto, reference, triton, cuda, composite, cpu, got 'fastest'"
    assert want in proc.stderr


def test_import_does_not_import_triton_or_transformers():
    proc = _python("import sys, reprokernels; print('triton' in sys.modules, 'transformers' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
