"""The native CPU extension: builds from a clean cache, is thread-count independent, and falls back
(auto) or refuses (native) clearly when it cannot be built. Values and gradients of the native
backend are checked in test_token_logprobs.py and test_ppo_loss.py with the other backends."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastppo.kernels import _native as native
from fastppo.kernels import ppo_loss, token_logprobs


def run_python(code, tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(FASTPPO_CACHE=str(tmp_path), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                          capture_output=True, text=True, timeout=600)


def test_builds_from_a_clean_cache(tmp_path):
    proc = run_python("""
        import torch
        from fastppo.kernels import _native as native
        from fastppo.kernels import token_logprobs
        x = torch.randn(5, 33)
        y = torch.randint(0, 33, (5,))
        ref = token_logprobs(x, y, backend="torch")
        assert torch.allclose(token_logprobs(x, y, backend="native"), ref, atol=1e-5)
        print(native.cache_dir())
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(tmp_path / "native")
    built = list((tmp_path / "native").rglob("fastppo_native_*.so"))
    assert len(built) == 1, built


def test_without_a_compiler_auto_falls_back_once_and_native_refuses(tmp_path):
    proc = run_python("""
        import warnings
        import torch
        from fastppo.kernels import token_logprobs
        x = torch.randn(4, 10)
        y = torch.randint(0, 10, (4,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = token_logprobs(x, y)          # auto on CPU: native wanted, not buildable
            b = token_logprobs(x, y)
        assert torch.equal(a, token_logprobs(x, y, backend="torch")) and torch.equal(a, b)
        messages = [str(w.message) for w in caught if "native CPU kernels unavailable" in str(w.message)]
        assert len(messages) == 1, messages
        try:
            token_logprobs(x, y, backend="native")
        except RuntimeError as e:
            print("REFUSED:", e)
    """, tmp_path, CXX="/nonexistent/c++")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED: fastppo native CPU kernels could not be built" in proc.stdout


def test_thread_count_does_not_change_results():
    torch.manual_seed(0)
    logits = torch.randn(37, 5003).bfloat16()
    labels = torch.randint(0, 5003, (37,))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = logits.clone().requires_grad_()
            lp, ent = token_logprobs(x, labels, temperature=0.9, return_entropy=True,
                                     backend="native")
            (lp * 2 - ent).sum().backward()
            results.append((lp, ent, x.grad))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_native_rejects_other_devices_and_dtypes():
    x = torch.randn(3, 5, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="backend='native' takes float32, bfloat16 or float16"):
        token_logprobs(x, y, backend="native")
    # float64 under "auto" goes to the reference instead
    torch.testing.assert_close(token_logprobs(x, y), token_logprobs(x, y, backend="torch"))


def test_ppo_loss_native_matches_torch_backend():
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 300)
    labels = torch.randint(0, 300, (3, 6))
    mask = torch.rand(3, 6) < 0.8
    args = (labels, torch.randn(3, 6) - 6, torch.randn(3, 6), mask)
    outs = {}
    for backend in ("native", "torch"):
        x = logits.clone().requires_grad_()
        out = ppo_loss(x, *args, entropy_coef=0.1, backend=backend)
        out.loss.backward()
        outs[backend] = (out.loss, x.grad)
    torch.testing.assert_close(outs["native"][0], outs["torch"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs["native"][1], outs["torch"][1], atol=1e-7, rtol=1e-5)


def test_auto_prefers_native_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTPPO_BACKEND", raising=False)
    from fastppo.kernels._checks import resolve_backend
    assert native.available()
    assert resolve_backend("auto", torch.device("cpu"), native_dtype=torch.bfloat16) == "native"
    assert resolve_backend("auto", torch.device("cpu"), native_dtype=torch.float64) == "torch"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"  # ops without native kernels
