"""fastppo.integrations.trl: TRL's own trainers and helpers, patched vs unpatched.

The helper cases are TRL's (tests/test_utils.py: TestSelectiveLogSoftmax, TestEntropyFromLogits;
tests/test_kernels.py: TestLogProbEntropy, TestChunkedLogProbFunction, which TRL runs on GPUs only),
rewritten here against the patched functions and a float64 reference. Where TRL asserts
`torch.equal` with torch's own half-precision log_softmax, we compare with the float64 value rounded
to the dtype instead: torch's half-precision result is not correctly rounded (../shared/PEERS.md).
"""
from __future__ import annotations

import importlib.util
import tempfile

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                reason="TRL is not installed (pip install 'fastppo[trl]')")

HALF = (torch.float16, torch.bfloat16)


@pytest.fixture
def ftrl():
    import fastppo.integrations.trl as ftrl
    with ftrl.patched(backend="auto"):
        yield ftrl
    assert not ftrl.is_patched()


def utils():
    import trl.trainer.utils as utils
    return utils


def truth_logprobs(logits, index, T=1.0):
    return torch.log_softmax(logits.double() / T, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def truth_entropy(logits, T=1.0):
    logp = torch.log_softmax(logits.double() / T, -1)
    return -(logp.exp() * logp).sum(-1)


def assert_rounded(got, truth, dtype):
    """float32/float64: within 1e-5 (TRL's tolerance); half: within one unit of the dtype's precision."""
    assert got.dtype == dtype
    if dtype in HALF:
        eps = torch.finfo(dtype).eps
        assert ((got.double() - truth).abs() <= eps * truth.abs() + 1e-30).all()
    else:
        torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-5)


# --- patching itself -------------------------------------------------------------------------------

def test_patch_replaces_every_binding_and_unpatch_restores_them_exactly():
    import fastppo.integrations.trl as ftrl
    import trl.trainer.grpo_trainer  # noqa: F401  (binds helpers of trl.trainer.utils by name)
    import trl.trainer.rloo_trainer  # noqa: F401
    u = utils()
    before = {n: getattr(u, n) for n in ("selective_log_softmax", "entropy_from_logits",
                                         "selective_log_softmax_and_entropy", "_ChunkedLogProbFunction")}
    with ftrl.patched():
        assert ftrl.is_patched()
        for name, original in before.items():
            assert getattr(u, name) is not original, name
        assert u._ChunkedLogProbFunction is ftrl.FusedHead
        ftrl.patch()  # idempotent
    for name, original in before.items():
        assert getattr(u, name) is original, name
    # A module that bound the helper by name before patching is restored too.
    import trl.experimental.orpo.orpo_trainer as orpo
    with ftrl.patched():
        assert orpo.selective_log_softmax is ftrl.selective_log_softmax
    assert orpo.selective_log_softmax is before["selective_log_softmax"]


def test_patched_block_restores_the_backend_it_found():
    import fastppo.integrations.trl as ftrl
    ftrl.patch(backend="torch")
    try:
        with ftrl.patched(backend="native"):
            assert ftrl._patcher.backend == "native"
        assert ftrl.is_patched() and ftrl._patcher.backend == "torch"
    finally:
        ftrl.unpatch()
    assert not ftrl.is_patched()


def test_version_outside_the_tested_range_warns(monkeypatch):
    import fastppo.integrations.trl as ftrl
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.9.0")
    with pytest.warns(RuntimeWarning, match="trl 0.9.0 is outside the versions"):
        with ftrl.patched():
            pass


def test_bad_backend_is_named():
    import fastppo.integrations.trl as ftrl
    with pytest.raises(ValueError, match="backend must be one of"):
        ftrl.patch(backend="cuda")
    assert not ftrl.is_patched()


# --- TRL's helper cases ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 1, 8])
def test_selective_log_softmax(ftrl, dtype, k):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 32, 1024, generator=g).to(dtype)
    shape = (4, 32) if k is None else (4, 32, k)
    index = torch.randint(0, 1024, shape, generator=g)
    got = utils().selective_log_softmax(logits, index)
    lse = torch.logsumexp(logits.double(), -1, keepdim=True)
    truth = logits.double().gather(-1, index if k else index.unsqueeze(-1)) - lse
    assert got.shape == shape
    assert_rounded(got, truth if k else truth.squeeze(-1), dtype)


def test_selective_log_softmax_temperature_is_applied_once(ftrl):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 50, generator=g)
    index = torch.randint(0, 50, (3, 7), generator=g)
    got = utils().selective_log_softmax(logits, index, temperature=0.6)
    torch.testing.assert_close(got.double(), truth_logprobs(logits, index, 0.6), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        utils().selective_log_softmax(logits, index, temperature=0.0)


def test_multi_index_gradient_and_row_mask(ftrl):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 40, generator=g, dtype=torch.float64).float().requires_grad_()
    index = torch.randint(0, 40, (2, 5, 3), generator=g)
    mask = torch.rand(2, 5, 3, generator=g) > 0.3
    up = torch.randn(2, 5, 3, generator=g)
    (utils().selective_log_softmax(logits, index, temperature=0.8, row_mask=mask) * up).sum().backward()
    ref = logits.detach().double().requires_grad_()
    want = torch.log_softmax(ref / 0.8, -1).gather(-1, index).masked_fill(~mask, 0)
    (want * up.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(768,), (32, 768), (8, 16, 768), (2, 4, 8, 768)])
def test_entropy_from_logits(ftrl, dtype, shape):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    for chunk_size in (1, 16):
        got = utils().entropy_from_logits(logits, chunk_size=chunk_size)
        assert got.shape == shape[:-1]
        assert_rounded(got, truth_entropy(logits), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logprob_weight, entropy_weight, use_mask",
                         [(2, None, True), (None, 0.5, True), (2, 0.5, True), (2, 0.5, False)])
def test_logprob_and_entropy_forward_and_backward(ftrl, dtype, logprob_weight, entropy_weight,
                                                  use_mask):
    # TRL's case: two full blocks and a partial one, maxima far apart, sliced (non-contiguous)
    # logits, index and mask, T = 0.7, and a write into the returned log-probs before backward.
    g = torch.Generator().manual_seed(4)
    V = 2053
    base = torch.randn(2, 5, V, generator=g)
    base[..., :1024] += 20
    base[..., 1024:2048] -= 20
    base = base.to(dtype).requires_grad_()
    index = torch.randint(V, (2, 5), generator=g)[:, 1:4]
    index[0, 0] = V - 1
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)[:, 1:4]
    row_mask = mask if use_mask else None

    logprobs, entropy = utils().selective_log_softmax_and_entropy(
        base[:, 1:4], index, temperature=0.7, row_mask=row_mask)
    logprobs[0, 2] = 0.0
    loss = (logprob_weight or 0) * logprobs.float().sum() + (entropy_weight or 0) * entropy.float().sum()
    loss.backward()

    ref = base.detach().double().requires_grad_()
    want_lp = truth_logprobs(ref[:, 1:4], index, 0.7)
    want_ent = truth_entropy(ref[:, 1:4], 0.7)
    if row_mask is not None:
        want_lp, want_ent = want_lp.masked_fill(~row_mask, 0), want_ent.masked_fill(~row_mask, 0)
    want_lp = want_lp.clone()
    want_lp[0, 2] = 0.0
    ((logprob_weight or 0) * want_lp.sum() + (entropy_weight or 0) * want_ent.sum()).backward()
    assert_rounded(logprobs.detach(), want_lp.detach(), dtype)
    assert_rounded(entropy.detach(), want_ent.detach(), dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(base.grad.double(), ref.grad, rtol=tol, atol=tol)


def test_entropy_requires_grad_false_detaches(ftrl):
    logits = torch.randn(3, 11, requires_grad=True)
    index = torch.randint(0, 11, (3,))
    _, entropy = utils().selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=False)
    assert not entropy.requires_grad


# --- the fused LM head (TRL's TestChunkedLogProbFunction cases) -------------------------------------

N, H, V = 64, 32, 128


def head_truth(hidden, weight, labels, T, bias=None, scale=1.0, softcap=None):
    logits = hidden.double() @ weight.double().t()
    if hidden.dtype in HALF:  # the head's logits are rounded to its dtype (gradient taken through)
        logits = logits + ((hidden.detach() @ weight.detach().t()).double() - logits).detach()
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return truth_logprobs(logits, labels, T), truth_entropy(logits, T)


def head_inputs(dtype=torch.float32, weight_dtype=None, seed=42):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(weight_dtype or dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("grad_of", ["logprobs", "entropy", "both"])
def test_fused_head_values_and_gradients(ftrl, T, grad_of):
    hidden, weight, labels = head_inputs()
    bias = torch.randn(V, generator=torch.Generator().manual_seed(5), requires_grad=True)
    calls = []
    real = ftrl.linear_token_logprobs
    ftrl.linear_token_logprobs = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        lp, ent, *rest = utils()._ChunkedLogProbFunction.apply(hidden, weight, bias, labels, T, 32, None, 1.0,
                                                               ("log_probs", "entropy"))
    finally:
        ftrl.linear_token_logprobs = real
    assert calls and rest == [None, None, None]
    want_lp, want_ent = head_truth(hidden, weight, labels, T, bias)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    pick = {"logprobs": (1, 0), "entropy": (0, 1), "both": (1, 0.5)}[grad_of]
    (pick[0] * lp.sum() + pick[1] * ent.sum()).backward()
    ref = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want_lp, want_ent = head_truth(*ref[:2], labels, T, ref[2])
    (pick[0] * want_lp.sum() + pick[1] * want_ent.sum()).backward()
    for got, want in zip((hidden, weight, bias), ref):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)  # TRL: 1e-4


def test_fused_head_log_probs_only(ftrl):
    # the reference model's call (add_fused_lm_head's default outputs): no entropy computed or returned
    hidden, weight, labels = head_inputs()
    lp, ent, *rest = utils()._ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.7, 32, None,
                                                           1.0, ("log_probs",))
    assert ent is None and rest == [None, None, None]
    want, _ = head_truth(hidden, weight, labels, 0.7)
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)


def test_fused_head_bf16_and_mixed_dtypes(ftrl):
    for dtype, wdtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)):
        hidden, weight, labels = head_inputs(dtype, wdtype)
        lp, *_ = utils()._ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32)
        lp.sum().backward()
        # TRL projects in the hidden states' dtype when autocast is off: the reference does too.
        ref = [hidden.detach().requires_grad_(), weight.detach().requires_grad_()]
        want, _ = head_truth(ref[0], ref[1].to(dtype), labels, 1.0)
        want.sum().backward()
        torch.testing.assert_close(lp.double(), want, rtol=1e-2, atol=1e-2)
        for got, w in zip((hidden, weight), ref):
            assert got.grad.dtype == got.dtype
            torch.testing.assert_close(got.grad.float(), w.grad.float(), rtol=1e-2, atol=1e-2)


def test_fused_head_autocast_uses_the_rounded_hidden_states(ftrl):
    # TRL's case: under bf16 autocast two hidden states equal after rounding give equal outputs and
    # equal weight gradients (the backward must not use the discarded fp32 bits).
    hidden = torch.linspace(1.0, 2.0, N * H).reshape(N, H).to(torch.bfloat16).float()
    perturbed = hidden + 1e-4
    assert torch.equal(hidden.to(torch.bfloat16), perturbed.to(torch.bfloat16))
    _, weight, labels = head_inputs()
    w2 = weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, *_ = utils()._ChunkedLogProbFunction.apply(hidden.requires_grad_(), weight, None, labels, 1.0, 32)
        b, *_ = utils()._ChunkedLogProbFunction.apply(perturbed.requires_grad_(), w2, None, labels, 1.0, 32)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("scale, softcap, outputs", [
    (0.5, None, ("log_probs", "entropy")), (1.0, 30.0, ("log_probs", "entropy")),
    (1.0, None, ("log_probs", "entropy", "is_top1"))])
def test_fused_head_defers_to_trl_for_what_fastppo_does_not_compute(ftrl, scale, softcap, outputs):
    hidden, weight, labels = head_inputs()
    calls = []
    real = ftrl.linear_token_logprobs
    ftrl.linear_token_logprobs = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        lp, ent, _, _, top1 = utils()._ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.7, 32,
                                                                    softcap, scale, outputs)
    finally:
        ftrl.linear_token_logprobs = real
    assert not calls
    want_lp, want_ent = head_truth(hidden, weight, labels, 0.7, scale=scale, softcap=softcap)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=1e-5)
    assert (top1 is not None) == ("is_top1" in outputs)


# --- TRL's own trainers, patched vs unpatched ---------------------------------------------------------

def _tiny_model_dir():
    from transformers import LlamaConfig, LlamaForCausalLM
    from fastppo.demo.sentiment import build_tokenizer
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    path = tempfile.mkdtemp(prefix="fastppo-trl-")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


def _train(trainer_name, model_dir, tok, steps=4):
    import trl
    from datasets import Dataset
    from fastppo.demo.sentiment import oracle
    config_cls = getattr(trl, trainer_name.replace("Trainer", "Config"))
    trainer_cls = getattr(trl, trainer_name)
    args = config_cls(output_dir=tempfile.mkdtemp(prefix="fastppo-trl-out-"), per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=6, max_steps=steps, learning_rate=1e-2,
                      beta=0.1, logging_steps=1, report_to="none", use_cpu=True, seed=0, temperature=0.7,
                      save_strategy="no", bf16=False)
    data = Dataset.from_dict({"prompt": ["the film was", "the book is", "the show was", "the plot is"] * 4})
    trainer = trainer_cls(model=model_dir, reward_funcs=lambda completions, **_: [oracle(c) for c in completions],
                          args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("trainer_name", ["GRPOTrainer", "RLOOTrainer"])
def test_trl_trainer_patched_equals_unpatched(trainer_name):
    """TRL's own trainer, 4 steps with sampling at T = 0.7, a KL to the reference model (beta 0.1),
    once as TRL ships and once patched: the same losses, KL, entropy and rewards step by step, and
    the same final weights (float32 tolerances; the kernels round differently, nothing else differs)."""
    import fastppo.integrations.trl as ftrl
    model_dir, tok = _tiny_model_dir()
    plain_logs, plain_weights = _train(trainer_name, model_dir, tok)
    calls = []
    real = ftrl.linear_token_logprobs
    ftrl.linear_token_logprobs = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with ftrl.patched():
            fast_logs, fast_weights = _train(trainer_name, model_dir, tok)
    finally:
        ftrl.linear_token_logprobs = real
    assert len(calls) >= 8, "the patched trainer did not go through fastppo's kernel"
    assert len(plain_logs) == len(fast_logs) == 4
    for step, (a, b) in enumerate(zip(plain_logs, fast_logs)):
        for key in ("loss", "kl", "entropy", "reward"):
            assert key in a, (trainer_name, key, sorted(a))
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key)
    worst = max((plain_weights[k] - fast_weights[k]).abs().max().item() for k in plain_weights)
    assert worst < 1e-5
