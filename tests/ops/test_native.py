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


def test_module_exposes_exactly_the_documented_functions():
    module = native.module()
    names = {name for name in dir(module) if not name.startswith("_")}
    assert names == {"token_logprobs_forward", "token_logprobs_backward", "ppo_loss_terms",
                     "gae_forward", "gae_backward", "truncation_thresholds"}
    for name in names:  # pybind11's __doc__: the signature, then the docstring from bindings.cpp
        doc = getattr(module, name).__doc__
        assert doc.startswith(f"{name}(") and "(CPU)" in doc, doc


def test_cpp_stats_rows_follow_STATS():
    """ppo_loss_terms writes every row where kernels/ppo_loss.py's STATS puts it (the rows are
    compiled in from STATS), and leaves the caller's rows (LP, ENTROPY, MAX, LOGSUM) alone."""
    from fastppo.kernels.ppo_loss import STATS

    torch.manual_seed(2)
    n = 257
    lp, ent = torch.randn(n) * 0.3 - 2, torch.rand(n) + 1
    old, adv, ref = lp + 0.3 * torch.randn(n), torch.randn(n), lp + 0.2 * torch.randn(n)
    values, returns = torch.randn(n), torch.randn(n)
    old_values = values + 0.3 * torch.randn(n)
    weights, mask = torch.rand(n) + 0.5, torch.rand(n) < 0.8
    row = {name: i for i, name in enumerate(STATS)}
    stats = torch.full((len(STATS), n), float("nan"))
    caller = dict(LP=lp, ENTROPY=ent, MAX=torch.full((n,), 7.0), LOGSUM=torch.full((n,), 9.0))
    for name, t in caller.items():
        stats[row[name]] = t
    native.module().ppo_loss_terms(
        stats, mask.to(torch.uint8), weights, old, adv, values, old_values, returns, ref,
        True, 0.8, 1.2, False, 0.0, True, 0.2, 0.5, 0.01, 0.1, 1)  # clip, value clip, k1 KL

    ratio = (lp - old).clamp(-20, 20).exp()
    pg_unclipped, pg_clipped = -adv * ratio, -adv * ratio.clamp(0.8, 1.2)
    clipped = pg_clipped > pg_unclipped
    vc = torch.minimum(torch.maximum(values, old_values - 0.2), old_values + 0.2)
    vf_unclipped, vf_clipped = (values - returns) ** 2, (vc - returns) ** 2
    vclipped = vf_clipped > vf_unclipped
    vf = 0.5 * torch.maximum(vf_unclipped, vf_clipped)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    written = dict(
        PG=pg, VF=vf, CLIPPED=clipped.float(), VCLIPPED=vclipped.float(),
        LOSS=pg - 0.01 * ent + 0.1 * (lp - ref) + 0.5 * vf,
        DLP=weights * (torch.where(clipped, 0.0, -adv * ratio) + 0.1),
        DV=weights * 0.5 * torch.where(vclipped, 0.0, values - returns))
    assert set(written) | set(caller) == set(STATS)
    assert 0 < clipped[mask].float().mean() < 1 and 0 < vclipped[mask].float().mean() < 1
    for name in STATS:
        want = caller[name] if name in caller else torch.where(mask, written[name], 0.0)
        torch.testing.assert_close(stats[row[name]], want, atol=1e-6, rtol=1e-5, msg=name)


def test_ppo_loss_terms_refuses_a_buffer_of_another_height():
    from fastppo.kernels.ppo_loss import STATS

    n = 4
    args = (torch.ones(n, dtype=torch.uint8),) + (torch.zeros(n),) * 3 + (None,) * 4
    with pytest.raises(RuntimeError, match=f"float32 \\({len(STATS)}, N\\) buffer"):
        native.module().ppo_loss_terms(torch.zeros(len(STATS) - 1, n), *args, False, 0.8, 1.2,
                                       False, 0.0, False, 0.0, 0.1, 0.0, 0.0, 0)
