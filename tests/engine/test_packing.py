"""Padding-free training is the padded result, only faster: packed rows (fastppo.data.PackedRows,
models.hidden_at(packed=True)) give the padded layout's log-probs, values, scores, losses and
gradients within float32 rounding; token-budget micro-batches (data.micro_batches, ppo.split) give
the one-micro-batch gradient whatever the split, and see every sequence exactly once."""
import json
import warnings
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from engine_testing import ppo_config
from fastppo.data import Batch, PackedRows, micro_batches, pack
from fastppo.heads import TokenHead
from fastppo.models import ActorCritic, PolicyLM, RewardModel, hidden_at, packing, precision
from fastppo.ppo import loss_options, ppo_epochs, train_ppo
from fastppo.rollout import Sampling

V = 97
# float32 rounding: packed rows change the matmuls' shapes, so the sums run in another order
F32 = dict(rtol=1e-5, atol=1e-5)
F32_GRAD = dict(rtol=1e-4, atol=1e-6)


def tiny_config():
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, tie_word_embeddings=False)


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(), attn_implementation="sdpa")


def ragged_batch(seed=0, rows=9):
    """Prompts of 1 to 12 tokens, responses of 1 token to the longest (24), ending at EOS (3) early
    and late, in random order."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 24, 2, 17, 5, 24, 1, 9, 13, 3, 20, 7][:rows]
    prompts = [torch.randint(4, V, (int(torch.randint(1, 13, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(rows)]
    responses = [torch.randint(4, V, (n - 1,), generator=g).tolist() + [3] for n in lengths]
    return pack(prompts, responses, 0)


# ------------------------------------------------------------------------------------ the layout

def test_packed_rows_hold_every_attended_token_once_with_its_position():
    batch = ragged_batch()
    rows = PackedRows.of(batch.input_ids, batch.attention_mask)
    mask = batch.attention_mask
    flat_ids, flat_pos = rows.input_ids.reshape(-1), rows.position_ids.reshape(-1)
    where = rows.where[mask]
    assert where.unique().numel() == where.numel() == int(mask.sum()) == rows.tokens
    assert torch.equal(flat_ids[where], batch.input_ids[mask])
    padded_positions = (mask.long().cumsum(-1) - 1)[mask]
    assert torch.equal(flat_pos[where], padded_positions)
    assert (rows.where[~mask] == -1).all()
    assert rows.input_ids.shape[1] == int(mask.sum(-1).max())  # rows as long as the longest
    assert rows.input_ids.numel() < mask.numel()  # fewer tokens than the padded rectangle
    with pytest.raises(ValueError, match="row_length=3 is shorter than the longest sequence"):
        PackedRows.of(batch.input_ids, batch.attention_mask, row_length=3)


def test_a_model_that_does_not_confine_attention_falls_back_to_padding(monkeypatch):
    import transformers.masking_utils as masking

    lm = tiny_lm()
    assert packing(lm, True) and not packing(lm, False)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.warns(UserWarning, match="does not confine attention .* run on padded rows"):
        assert not packing(lm, True)


# ---------------------------------------------------------------------- packed == padded, float32

def run_both(model, call):
    """call() with the model's forwards padded, then packed."""
    out = []
    for packed in (False, True):
        model.packed = packed
        out.append(call())
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-head"])
@pytest.mark.parametrize("truncation", [{}, {"top_k": 5, "top_p": 0.9}], ids=["plain", "top-k-p"])
def test_actor_critic_packed_equals_padded_in_value_and_gradient(fused, truncation):
    lm = tiny_lm()
    model = ActorCritic(lm)
    torch.nn.init.normal_(model.value_head.weight, std=0.1)
    model.head = TokenHead(lm, fused)
    batch = ragged_batch()
    mask = batch.response_mask
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(mask.shape, generator=g, dtype=torch.float32)
    returns = torch.randn(mask.shape, generator=g, dtype=torch.float32)

    def call():
        model.zero_grad()
        states, values = model(batch)
        old = model.head.logprobs(states.detach(), batch.labels, **truncation)
        old = torch.where(mask & (old == float("-inf")), 0.0, old).detach()
        out = model.head.ppo_loss(states, batch.responses, old + 0.01 * advantages, advantages,
                                  mask & (old != 0), values=values, old_values=returns * 0.5,
                                  returns=returns, value_clip=0.2, vf_coef=0.5, entropy_coef=0.01,
                                  allow_outside_kept=True, **truncation)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        return old[mask], values[mask].detach(), out.loss.detach(), grads

    (old0, v0, loss0, g0), (old1, v1, loss1, g1) = run_both(model, call)
    torch.testing.assert_close(old1, old0, **F32)
    torch.testing.assert_close(v1, v0, **F32)
    torch.testing.assert_close(loss1, loss0, **F32)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **F32_GRAD, msg=k)
    assert any(g.abs().sum() > 0 for g in g0.values())


def test_reference_and_reward_model_packed_equal_padded():
    lm = tiny_lm(1)
    reference = PolicyLM(lm)
    batch = ragged_batch(2)
    ref0, ref1 = run_both(reference, lambda: reference.head.logprobs(reference(batch), batch.labels))
    torch.testing.assert_close(ref1[batch.response_mask], ref0[batch.response_mask],
                               **F32)
    torch.manual_seed(3)
    rm = RewardModel(AutoModelForSequenceClassification.from_config(
        replace(tiny_config(), num_labels=1), attn_implementation="sdpa"))

    def scores():
        rm.zero_grad()
        s = rm(batch)
        s.sum().backward()
        return s.detach(), {k: p.grad.clone() for k, p in rm.named_parameters()}
    (s0, g0), (s1, g1) = run_both(rm, scores)
    torch.testing.assert_close(s1, s0, **F32)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **F32_GRAD, msg=k)


def test_sft_sequences_packed_equal_padded_in_float32_and_bf16():
    lm = tiny_lm(4)
    policy = PolicyLM(lm)
    batch = ragged_batch(5, rows=12)
    sequences = Batch.sequences(batch.input_ids[:, batch.prompt_len - 4:],
                                batch.attention_mask[:, batch.prompt_len - 4:])
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 0.05)):
        def nll():
            policy.zero_grad()
            with precision("cpu", dtype):
                lp = policy.head.logprobs(policy(sequences), sequences.labels)
            (-lp.sum()).backward()
            return lp.detach()[sequences.response_mask], lm.model.layers[0].mlp.up_proj.weight.grad
        (lp0, g0), (lp1, g1) = run_both(policy, nll)
        torch.testing.assert_close(lp1, lp0, rtol=tol, atol=tol)
        torch.testing.assert_close(g1, g0, rtol=tol, atol=tol * g0.abs().max().item())


def test_lora_packed_equals_padded():
    pytest.importorskip("peft")
    from types import SimpleNamespace

    from fastppo.lora import add_lora

    lm = tiny_lm(6)
    add_lora(lm, SimpleNamespace(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                                 lora_target_modules=["all-linear"]))
    for name, p in lm.named_parameters():
        if "lora_B" in name:  # (zero at initialisation: the adapters would change nothing)
            torch.nn.init.normal_(p, std=0.1)
    model = PolicyLM(lm)
    batch = ragged_batch(7)

    def call():
        model.zero_grad()
        lp = model.head.logprobs(model(batch), batch.labels)
        lp.sum().backward()
        return lp.detach()[batch.response_mask], {
            k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    (lp0, g0), (lp1, g1) = run_both(model, call)
    torch.testing.assert_close(lp1, lp0, **F32)
    assert g0 and all(torch.allclose(g1[k], g0[k], **F32_GRAD) for k in g0)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-head"])
def test_response_tokens_alone_equal_the_grid(fused):
    """Packed, the LM head and the loss run on the response tokens alone (ResponseTokens): the
    log-probs, values, token-mean loss and gradients of the (B, R) grid."""
    from fastppo.data import ResponseTokens

    lm = tiny_lm(11)
    model = ActorCritic(lm)
    torch.nn.init.normal_(model.value_head.weight, std=0.1)
    model.head, model.packed = TokenHead(lm, fused), True
    batch = ragged_batch(12)
    mask = batch.response_mask
    advantages = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2)) * mask

    def call(compact):
        on = ResponseTokens(mask, compact)
        model.zero_grad()
        states, values = model(batch, at=on.at)
        lp = model.head.logprobs(states.detach(), on.take(batch.labels))  # laid out as `on` says
        out = model.head.ppo_loss(states, on.take(batch.responses), lp - 0.05,
                                  on.take(advantages), on.take(mask), values=values,
                                  old_values=on.take(advantages), returns=on.take(advantages * 2),
                                  reduction="sum")
        out.loss.backward()
        return (on.put(lp), on.put(values.detach()), out.loss.detach(),
                {k: p.grad.clone() for k, p in model.named_parameters()})
    (lp0, v0, l0, g0), (lp1, v1, l1, g1) = call(False), call(True)
    assert states_shape_is_compact(model, batch, mask)
    torch.testing.assert_close(lp1[mask], lp0[mask], **F32)
    torch.testing.assert_close(v1[mask], v0[mask], **F32)
    torch.testing.assert_close(l1, l0, **F32)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **F32_GRAD, msg=k)


def states_shape_is_compact(model, batch, mask):
    states, values = model(batch, at=mask)
    return states.shape[0] == values.shape[0] == int(mask.sum()) < mask.numel()


def test_hidden_at_one_column_per_row():
    lm = tiny_lm(8)
    batch = ragged_batch(9)
    last = batch.attention_mask.shape[1] - 1 - batch.attention_mask.flip(-1).long().argmax(-1)
    a = hidden_at(lm, batch.input_ids, batch.attention_mask, last)
    b = hidden_at(lm, batch.input_ids, batch.attention_mask, last, packed=True)
    assert a.shape == (len(last), 1, 32)
    torch.testing.assert_close(b, a, **F32)


# --------------------------------------------------------------------------------- micro-batches

@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(0, 120),
       st.integers(1, 8))
def test_micro_batches_hold_every_row_once_under_a_strict_cap(lengths, cap, at_least):
    if cap and max(lengths) > cap:
        first = next(i for i, n in enumerate(lengths) if n > cap)
        with pytest.raises(ValueError, match=rf"sequence {first} has {lengths[first]} tokens \(prompt "
                                             rf"\+ response\), more than max_tokens_per_micro_batch={cap}"):
            micro_batches(lengths, cap, at_least)
        return
    parts = micro_batches(lengths, cap, at_least)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))  # each once, none lost
    assert all(p and p == sorted(p) for p in parts)
    assert len(parts) >= min(at_least, len(lengths))
    if cap:
        assert all(sum(lengths[i] for i in p) <= cap for p in parts)
        assert len(parts) >= -(-sum(lengths) // cap)
    else:
        assert len(parts) == 1 or at_least > 1


def test_micro_batches_are_balanced_by_tokens():
    parts = micro_batches([40, 40, 10, 10, 10, 10, 5, 5], 70)
    loads = sorted(sum([40, 40, 10, 10, 10, 10, 5, 5][i] for i in p) for p in parts)
    assert loads == [65, 65]


def rollout_batch(seed=0):
    """A PPO batch with its per-token tensors, as the loop hands it to ppo_epochs."""
    g = torch.Generator().manual_seed(seed)
    batch = ragged_batch(seed, rows=12)
    B, R = batch.response_mask.shape
    mask = batch.response_mask
    t = {name: torch.randn(B, R, generator=g, dtype=torch.float32) * mask
         for name in ("advantages", "old_values", "returns", "ref_logprobs")}
    t["old_logprobs"] = -torch.rand(B, R, generator=g, dtype=torch.float32) * 3 * mask
    return batch.with_tokens(**t)


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_one_mini_batch_gives_one_gradient_whatever_the_split(tmp_path, packed, reduction):
    """ppo_epochs over one mini-batch of 12 ragged sequences, split into 1, 2, 3 and 7
    micro-batches: the accumulated gradient (SGD at lr 0 keeps it) is the one-micro-batch one."""
    lm = tiny_lm(10)
    model = ActorCritic(lm)
    torch.nn.init.normal_(model.value_head.weight, std=0.1)
    model.packed = packed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = rollout_batch()
    total = int(batch.attention_mask.sum())
    longest = int(batch.attention_mask.sum(-1).max())
    grads, counts, caps = {}, {}, {}
    for want in (1, 2, 3, 7):
        cap = 0 if want == 1 else next(c for c in range(longest, total + 1)
                                       if len(micro_batches(batch.attention_mask.sum(-1).tolist(),
                                                            c)) == want)
        cfg = replace(ppo_config(tmp_path, tmp_path / "run"), batch_size=12, mini_batch_size=12,
                      max_tokens_per_micro_batch=cap, loss_reduction=reduction, kl_in_loss=True,
                      device="cpu")
        options = loss_options(cfg, Sampling(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0), 0.05, True)
        _, _, micro = ppo_epochs(model, optimizer, batch, [torch.randperm(12)], cfg, options,
                                 critic=True, at="test")
        counts[want], caps[want] = micro, cap
        grads[want] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    for want in (2, 3, 7):
        assert len(counts[want]) == want and sum(counts[want]) == total  # every token once
        assert max(counts[want]) <= caps[want]
        torch.testing.assert_close(grads[want], grads[1], **F32_GRAD)
    assert grads[1].abs().max() > 0


# ------------------------------------------------------------------------------ a whole PPO run

def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_a_ppo_run_packed_and_micro_batched_equals_the_padded_run(small_run, tmp_path, estimator):
    out, _ = small_run
    base = dict(iterations=3, batch_size=8, mini_batch_size=4, advantage_estimator=estimator,
                samples_per_prompt=4 if estimator == "grpo" else 1, save_every=3)
    runs = {}
    for name, options in {"padded": dict(packed=False), "packed": dict(packed=True),
                          "micro": dict(packed=True, max_tokens_per_micro_batch=20)}.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_ppo(ppo_config(out, tmp_path / name, **base, **options))
        runs[name] = read_metrics(tmp_path / name)
    for name in ("packed", "micro"):
        for a, b in zip(runs["padded"], runs[name], strict=True):
            assert b["first_ratio_max_error"] <= 1e-5
            for key, value in a.items():
                if key.startswith(("time_", "tokens_per", "peak_memory", "iteration_memory",
                                   "micro_batches")) or isinstance(value, str):
                    continue
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (name, key)
        from safetensors.torch import load_file
        w0 = load_file(tmp_path / "padded" / "checkpoint" / "model.safetensors")
        w1 = load_file(tmp_path / name / "checkpoint" / "model.safetensors")
        for k in w0:
            torch.testing.assert_close(w1[k], w0[k], rtol=1e-4, atol=1e-4, msg=k)
    for packed, micro in zip(runs["packed"], runs["micro"]):
        assert packed["micro_batches"] == 2 * 2  # ppo_epochs x mini-batches: one micro-batch each
        assert micro["micro_batches"] > packed["micro_batches"] and micro["tokens_per_micro_batch"] <= 20
        # the same tokens, each seen once per epoch, however they were split
        assert micro["micro_batches"] * micro["tokens_per_micro_batch"] == pytest.approx(
            packed["micro_batches"] * packed["tokens_per_micro_batch"], rel=1e-12)
        assert 0 < packed["padding_fraction"] < 1
