"""Multi-turn episodes (fastppo.episodes): the layout of an episode by hand, environment tokens that
no gradient sees, the sampled ids kept through a re-tokenisation trap, every way a tool or an
environment can fail, and whole PPO runs on episodes (ratio = 1, the metrics)."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from fastppo import episodes
from fastppo.data import Batch, ResponseTokens
from fastppo.episodes import (EnvironmentFailed, Limits, Renderer, ToolEnvironment,
                              parse_tool_calls, run_episodes, tool_schemas)
from fastppo.heads import TokenHead
from fastppo.models import ActorCritic

sys.path.insert(0, str(Path(__file__).parent))
from chat_testing import chat_tokenizer, save_policy  # noqa: E402


class Scripted:
    """An engine whose turns are given: turn t of row r is script[r][t] (token ids)."""

    def __init__(self, script, pad_id=0):
        self.script, self.pad_id, self.calls = script, pad_id, []

    def __call__(self, contexts, rows, turn):
        self.calls.append(([list(c) for c in contexts], rows.tolist(), turn))
        turns = [self.script[int(r)][turn] for r in rows]
        P, R = max(map(len, contexts)), max(map(len, turns))
        ids = torch.zeros(len(turns), P + R, dtype=torch.long)
        response = torch.zeros(len(turns), R, dtype=torch.bool)
        for i, (c, t) in enumerate(zip(contexts, turns)):
            ids[i, P - len(c):P] = torch.tensor(c)
            ids[i, P:P + len(t)] = torch.tensor(t)
            response[i, :len(t)] = True
        return Batch(ids, torch.ones_like(ids, dtype=torch.bool), response, P,
                     torch.full(response.shape, -0.5) * response)


class Echo:
    """Replies "ok <n>" to each turn, with reward n; done after `turns` turns."""

    def __init__(self, turns=2):
        self.turns, self.n = turns, 0

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, turn):
        self.n += 1
        return f"ok {self.n}", float(self.n), self.n >= self.turns


def ids_of(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_two_turn_episode_layout_by_hand():
    tok = chat_tokenizer()
    renderer = Renderer(tok)
    eos = tok.eos_token_id
    turn1, turn2 = ids_of(tok, "hi") + [eos], ids_of(tok, "bye!") + [eos]
    engine = Scripted({0: [turn1, turn2]})
    batch, counts = run_episodes(engine, lambda: Echo(2), [{"prompt": "go"}], renderer,
                                 Limits(4, 8, 64), global_rows=torch.tensor([0]), pad_id=0)
    prompt = ids_of(tok, "<|im_start|>user\ngo<|im_end|>\n<|im_start|>assistant\n")
    reply = ids_of(tok, "\n<|im_start|>user\nok 1<|im_end|>\n<|im_start|>assistant\n")
    assert batch.input_ids[0].tolist() == prompt + turn1 + reply + turn2
    model = [True] * len(turn1) + [False] * len(reply) + [True] * len(turn2)
    assert batch.response_mask[0].tolist() == model  # exactly the model's positions count
    assert batch.attention_mask.all()
    rewards = torch.zeros(len(model))
    rewards[len(turn1) - 1], rewards[-1] = 1.0, 2.0  # on each turn's last token
    assert torch.equal(batch.per_token["turn_rewards"][0], rewards)
    assert batch.sampler_logprobs[0].tolist() == [-0.5 if m else 0.0 for m in model]
    assert batch.per_row["turns"].tolist() == [2.0] and batch.per_row["truncated"].tolist() == [0.0]
    # the second turn continued the sampled ids as they are
    assert engine.calls[1][0][0] == prompt + turn1 + reply and engine.calls[1][2] == 1
    assert counts["env_errors"] == 0


def test_limits_end_an_episode_whole_and_mark_it_truncated():
    tok = chat_tokenizer()
    eos = tok.eos_token_id
    turn = ids_of(tok, "hm") + [eos]
    script = {0: [turn] * 5, 1: [ids_of(tok, "abcdefgh")] * 5}  # row 1: no EOS within max_new_tokens
    batch, counts = run_episodes(Scripted(script), lambda: Echo(99), [{"prompt": "a"}, {"prompt": "b"}],
                                 Renderer(tok), Limits(5, 8, 40), global_rows=torch.tensor([0, 1]),
                                 pad_id=0)
    region = batch.attention_mask[:, batch.prompt_len:].sum(-1)
    assert region[0] <= 40 and batch.per_row["turns"].tolist() == [2.0, 1.0]
    assert batch.per_row["truncated"].tolist() == [1.0, 1.0] and counts["truncated"] == 2
    # every episode ends after a whole model turn: its last token is the model's
    last = batch.attention_mask[:, batch.prompt_len:].long().cumsum(-1).argmax(-1)
    assert batch.response_mask[torch.arange(2), last].all()
    # max_turns reached: not truncated
    batch, _ = run_episodes(Scripted({0: [turn] * 2}), lambda: Echo(99), [{"prompt": "a"}],
                            Renderer(tok), Limits(2, 8, 64), global_rows=torch.tensor([0]), pad_id=0)
    assert batch.per_row["turns"].tolist() == [2.0] and batch.per_row["truncated"].tolist() == [0.0]


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-head"])
def test_environment_tokens_change_no_gradient(fused):
    """Editing what the model 'would have written' at the environment's positions (the logits
    there, or the environment's token ids as labels) changes neither the loss nor any gradient;
    compacted to the model's tokens, the same loss and gradients without computing them at all."""
    from fastppo.models import tiny_llama

    tok = chat_tokenizer()
    eos = tok.eos_token_id
    script = {0: [ids_of(tok, "hi") + [eos], ids_of(tok, "yo") + [eos]],
              1: [ids_of(tok, "abc") + [eos], ids_of(tok, "d") + [eos]]}
    batch, _ = run_episodes(Scripted(script), lambda: Echo(2), [{"prompt": "x"}, {"prompt": "yz"}],
                            Renderer(tok), Limits(4, 8, 64), global_rows=torch.tensor([0, 1]),
                            pad_id=0)
    torch.manual_seed(0)
    model = ActorCritic(tiny_llama(len(tok), hidden=32, layers=1, heads=2))
    model.head = TokenHead(model.lm, fused)
    mask = batch.response_mask
    env = batch.attention_mask[:, batch.prompt_len:] & ~mask
    assert env.any()
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(mask.shape, generator=g) * mask

    def loss_and_grads(edit: bool, compact: bool):
        on = ResponseTokens(mask, compact)
        model.zero_grad()
        states, values = model(batch, at=on.at)
        labels = batch.responses.clone()
        if edit and not compact:
            if fused:  # the hidden states there
                states = states + 3.0 * env[..., None]
            else:
                states = states + 5.0 * torch.randn(states.shape, generator=g) * env[..., None]
            labels[env] = (labels[env] + 7) % len(tok)  # the environment's tokens, edited
        out = model.head.ppo_loss(states, on.take(labels), on.take(torch.full(mask.shape, -2.0)),
                                  on.take(advantages), on.take(mask), values=values,
                                  old_values=on.take(advantages), returns=on.take(advantages),
                                  reduction="sum")
        out.loss.backward()
        return out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                   if p.grad is not None}
    l0, g0 = loss_and_grads(False, False)
    l1, g1 = loss_and_grads(True, False)
    l2, g2 = loss_and_grads(False, True)
    assert torch.equal(l1, l0) and g0.keys() == g1.keys()
    for k in g0:
        assert torch.equal(g1[k], g0[k]), k
        torch.testing.assert_close(g2[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)
    torch.testing.assert_close(l2, l0, rtol=1e-5, atol=1e-6)


def test_sampled_ids_are_kept_through_a_retokenisation_trap():
    tok = chat_tokenizer(merges=True)
    a, b, eos = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), tok.eos_token_id
    sampled = [a, b, eos]
    assert ids_of(tok, tok.decode(sampled, skip_special_tokens=True)) == [tok.convert_tokens_to_ids("ab")]
    seen = []

    class Recorder(Echo):
        def step(self, turn):
            seen.append(turn)
            return super().step(turn)
    batch, _ = run_episodes(Scripted({0: [sampled, sampled]}), lambda: Recorder(2),
                            [{"prompt": "q"}], Renderer(tok), Limits(2, 4, 64),
                            global_rows=torch.tensor([0]), pad_id=0)
    region = batch.input_ids[0, batch.prompt_len:][batch.response_mask[0]].tolist()
    assert region == sampled + sampled  # the ids the engine drew, not those of the decoded text
    assert seen == ["ab", "ab"]  # the environment reads the text


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def boom(x: int) -> int:
    """Raises.

    Args:
        x: anything
    """
    raise RuntimeError("tool broke")


def slow(x: int) -> str:
    """Sleeps past its limit.

    Args:
        x: anything
    """
    time.sleep(1.0)
    return "late"


def opaque(x: int) -> object:
    """Returns what is not text.

    Args:
        x: anything
    """
    return object()


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_every_tool_failure_is_a_named_counted_message():
    tools = {f.__name__: f for f in (add, boom, slow, opaque)}
    env = ToolEnvironment(tools, timeout=0.2)
    assert env.reset({"prompt": "p"}) == "p"
    turn = (call("add", a=2, b=40) + call("boom", x=1) + call("slow", x=1) + call("opaque", x=1)
            + call("nope") + call("add", a=1) + "<tool_call>{not json</tool_call>")
    start = time.perf_counter()
    messages, reward, done = env.step(turn)
    assert time.perf_counter() - start < 0.9  # the hung tool was not waited for
    assert not done and reward == 0.0 and [m["role"] for m in messages] == ["tool"] * 7
    contents = [m["content"] for m in messages]
    assert contents[0] == "42"
    assert "boom raised RuntimeError: tool broke" in contents[1]
    assert "did not return within 0.2 s" in contents[2]
    assert "opaque returned object" in contents[3]
    assert "no tool named 'nope'" in contents[4] and "bad arguments for add" in contents[5]
    assert "malformed tool call: not JSON" in contents[6]
    assert env.counts == {"tool_calls": 7, "tool_errors": 1, "tool_timeouts": 1,
                          "tool_bad_results": 1, "malformed_calls": 3}
    assert env.step("the answer is 42") == (None, 0.0, True)  # no call: the episode ends
    assert parse_tool_calls("<tool_call>{}") == ["<tool_call> without </tool_call>"]
    for empty in ("", ", \"arguments\": null", ", \"arguments\": \"\""):  # a call without arguments
        assert parse_tool_calls(f'<tool_call>{{"name": "f"{empty}}}</tool_call>') == [("f", {})]
    strict = ToolEnvironment(tools, timeout=0.2, strict=True)
    with pytest.raises(EnvironmentFailed, match="tool error: error: boom raised RuntimeError"):
        strict.step(call("add", a=1, b=2) + call("boom", x=1))


def test_a_tool_without_a_docstring_is_refused_by_name():
    def bare(x: int):
        return x
    with pytest.raises(ValueError, match="tool 'bare' cannot be offered"):
        tool_schemas([bare])


class Raising(Echo):
    def step(self, turn):
        raise KeyError("env broke")


def test_an_environment_that_raises_ends_its_episode_or_stops_a_strict_run():
    tok = chat_tokenizer()
    turn = ids_of(tok, "x") + [tok.eos_token_id]
    make = {0: lambda: Raising(), 1: lambda: Echo(1)}
    envs = iter([make[0](), make[1]()])
    batch, counts = run_episodes(Scripted({0: [turn], 1: [turn]}), lambda: next(envs),
                                 [{"prompt": "a"}, {"prompt": "b"}], Renderer(tok), Limits(3, 4, 32),
                                 global_rows=torch.tensor([0, 1]), pad_id=0)
    assert counts["env_errors"] == 1 and batch.per_row["turns"].tolist() == [1.0, 1.0]
    with pytest.raises(EnvironmentFailed, match="environment step raised KeyError: 'env broke'"):
        run_episodes(Scripted({0: [turn]}), Raising, [{"prompt": "a"}], Renderer(tok),
                     Limits(3, 4, 32, strict=True), global_rows=torch.tensor([0]), pad_id=0)
    # a step that returns what is not (observation, reward: a finite number, done), or an
    # observation that cannot be rendered: the episode ends, counted; strict: one line
    for value, problem in ((("ok", float("nan"), False), "the reward nan"),
                           (("ok", [1.0], False), r"the reward \[1.0\]"),
                           (({"role": "tool"}, 0.0, False), "an observation of type dict"),
                           (("ok", 0.0), "tuple, not"), (([{"role": "tool"}], 0.0, False), None),
                           (("ok", torch.ones(2), False), "the reward tensor")):
        closed = []
        batch, counts = run_episodes(Scripted({0: [turn, turn]}), lambda: Returns(value, closed),
                                     [{"prompt": "a"}], Renderer(tok), Limits(3, 4, 32),
                                     global_rows=torch.tensor([0]), pad_id=0)
        assert counts["env_errors"] == 1 and batch.per_row["turns"].tolist() == [1.0], value
        assert torch.isfinite(batch.per_token["turn_rewards"]).all() and closed == [True]
        if problem:
            with pytest.raises(EnvironmentFailed, match=f"environment step returned {problem}"):
                run_episodes(Scripted({0: [turn]}), lambda: Returns(value, []), [{"prompt": "a"}],
                             Renderer(tok), Limits(3, 4, 32, strict=True),
                             global_rows=torch.tensor([0]), pad_id=0)
    with pytest.raises(ValueError, match="returned a object, which has no reset or step method"):
        run_episodes(Scripted({0: [turn]}), object, [{"prompt": "a"}], Renderer(tok),
                     Limits(3, 4, 32), global_rows=torch.tensor([0]), pad_id=0)


class Returns:
    """An environment whose step returns `value`; records that it was closed."""

    def __init__(self, value, closed):
        self.value, self.closed = value, closed

    def reset(self, row):
        return row["prompt"]

    def step(self, turn):
        return self.value

    def close(self):
        self.closed.append(True)


def test_rewards_of_any_real_number_type_are_taken():
    import numpy as np

    from fastppo.episodes import Limits as L, guarded

    for reward, want in ((True, 1.0), (np.float32(0.5), 0.5), (np.int64(2), 2.0),
                         (torch.tensor(-1.5), -1.5)):
        assert guarded(lambda _: ("ok", reward, False), "x", "step", L(1, 1, 1)) == ("ok", want,
                                                                                   False)


def test_a_cut_last_turn_is_truncated_and_a_text_observation_is_a_user_message():
    tok = chat_tokenizer()
    cut = ids_of(tok, "abcd")  # max_new_tokens reached without EOS, on the last turn
    batch, counts = run_episodes(Scripted({0: [ids_of(tok, "x") + [tok.eos_token_id], cut]}),
                                 lambda: Echo(99), [{"prompt": "go"}], Renderer(tok),
                                 Limits(2, 4, 64), global_rows=torch.tensor([0]), pad_id=0)
    assert batch.per_row["truncated"].tolist() == [1.0] and counts["truncated"] == 1

    class TextFirst(Echo):
        def reset(self, row):
            return row["prompt"]
    batch, _ = run_episodes(Scripted({0: [cut]}), TextFirst, [{"prompt": "go"}], Renderer(tok),
                            Limits(1, 4, 64), global_rows=torch.tensor([0]), pad_id=0)
    P = batch.prompt_len
    assert batch.input_ids[0, :P].tolist() == ids_of(
        tok, "<|im_start|>user\ngo<|im_end|>\n<|im_start|>assistant\n")
    # an engine that returns an empty turn: the episode ends there, nothing placed before it
    batch, _ = run_episodes(Scripted({0: [[]]}), lambda: Echo(99), [{"prompt": "go"}],
                            Renderer(tok), Limits(3, 4, 64), global_rows=torch.tensor([0]),
                            pad_id=0)
    assert batch.per_row["truncated"].tolist() == [1.0] and not batch.response_mask.any()


def test_renderer_refuses_what_it_cannot_render():
    plain = chat_tokenizer(template=None)
    with pytest.raises(ValueError, match="chat messages need a chat template"):
        Renderer(plain).prompt([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="tools need a chat template"):
        Renderer(plain, tool_schemas([add]))
    assert Renderer(plain).observation("ok") == ids_of(plain, "ok")  # plain text: appended as is
    other_end = chat_tokenizer(template=episodes_template_without_eos())
    Renderer(other_end).prompt([{"role": "user", "content": "x"}])  # a single turn: fine
    with pytest.raises(ValueError, match="does not end an assistant turn with the EOS token"):
        Renderer(other_end).observation("x")  # an episode's next turn: the model would not stop
    with pytest.raises(ValueError, match="message 0 must be"):
        Renderer(chat_tokenizer()).prompt([{"role": "user"}])


def episodes_template_without_eos():
    return "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


def test_tools_are_offered_through_the_template():
    tok = chat_tokenizer()
    text = tok.decode(Renderer(tok, tool_schemas([add])).prompt([{"role": "user", "content": "x"}]))
    assert '"name": "add"' in text and text.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------- whole PPO runs


ENV_MODULE = '''
class Countdown:
    """Replies with a number; rewards a turn that names it, and turns of odd length (so that
    a random policy's episodes differ in reward); two turns."""
    def __init__(self):
        self.n = 0
    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]
    def step(self, turn):
        self.n += 1
        return f"say {self.n}", float(str(self.n) in turn) + len(turn) % 2, self.n >= 2


def make():
    return Countdown()


def add(a: int, b: int) -> int:
    """Adds.

    Args:
        a: first
        b: second
    """
    return a + b
'''


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("episodes")
    # EOS at about 40% a token: turns of a few tokens, episodes of several turns
    policy = save_policy(root / "policy", chat_tokenizer(), eos_logit=4.2, hidden=32, layers=1,
                         heads=2)
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": p}) + "\n" for p in ("count", "go on", "hi")))
    (root / "envmod_episodes.py").write_text(ENV_MODULE)
    return root, policy


def episode_config(root, policy, out, **overrides):
    from fastppo.config import PPOConfig

    cfg = dict(prompts=str(root / "prompts.jsonl"), policy=str(policy), env="envmod_episodes:make",
               out=str(root / out), iterations=2, batch_size=4, mini_batch_size=2,
               samples_per_prompt=2, advantage_estimator="grpo", max_new_tokens=6, max_turns=3,
               max_episode_tokens=48, seed=1, save_every=100, lr=1e-3)
    cfg.update(overrides)
    return PPOConfig(**cfg).check()


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_ppo_on_episodes_sees_ratio_one_and_reports_them(chat_run, monkeypatch, estimator):
    from fastppo.ppo import train_ppo

    root, policy = chat_run
    monkeypatch.syspath_prepend(str(root))
    cfg = episode_config(root, policy, f"run-{estimator}", advantage_estimator=estimator,
                         samples_per_prompt=2 if estimator == "grpo" else 1)
    train_ppo(cfg)
    rows = metrics(cfg.out)
    assert len(rows) == 2
    for row in rows:
        assert row["first_ratio_max_error"] <= 1e-5
        assert 1 < row["turns_per_episode"] <= 3 and 0 < row["model_token_fraction"] < 1
        assert row["env_errors"] == 0 and row["sampler_gap_max"] < 1e-3


def test_packed_and_padded_episodes_train_alike(chat_run, monkeypatch):
    """On episodes (holes in the response mask), the packed path (model tokens only) and the padded
    one (the grid; the LM head still runs on the model's tokens alone) give one run."""
    from fastppo.ppo import train_ppo

    root, policy = chat_run
    monkeypatch.syspath_prepend(str(root))
    runs = []
    for packed in (True, False):
        cfg = episode_config(root, policy, f"packed-{packed}", packed=packed)
        train_ppo(cfg)
        runs.append(metrics(cfg.out))
    for a, b in zip(*runs, strict=True):
        assert a["policy_loss"] != 0 and a["first_ratio_max_error"] <= 1e-5
        for key in ("env_reward", "turns_per_episode", "model_token_fraction", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        # sums of O(1) terms that cancel, and differences of log-probs: float32 rounding of each
        for key in ("policy_loss", "kl"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    from safetensors.torch import load_file

    w = [load_file(root / f"packed-{p}" / "checkpoint" / "model.safetensors") for p in (True, False)]
    for k in w[0]:
        torch.testing.assert_close(w[0][k], w[1][k], rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------- SFT on conversations

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6!"}]


def hand_built(tok):
    """The rendered conversation's ids, and which of them are the assistant's (by hand)."""
    parts = [("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n2+2<|im_end|>\n"
              "<|im_start|>assistant\n", False), ("4<|im_end|>", True),
             ("\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n", False),
             ("6!<|im_end|>", True), ("\n", False)]
    ids, trained = [], []
    for text, mine in parts:
        ids += ids_of(tok, text)
        trained += [mine] * len(ids_of(tok, text))
    return ids, trained


def test_sft_conversation_trains_the_assistant_tokens_only():
    tok = chat_tokenizer()
    prompt, rest, trained = Renderer(tok, where="messages").conversation(CONVERSATION)
    ids, mask = hand_built(tok)
    assert prompt + rest == ids[:len(prompt) + len(rest)]
    assert [False] * len(prompt) + trained == mask[:len(prompt) + len(rest)]
    assert not any(mask[len(prompt) + len(rest):])  # only template glue after the last turn
    with pytest.raises(ValueError, match="chat template"):
        Renderer(chat_tokenizer(template=None), where="messages").conversation(CONVERSATION)


def test_sft_run_on_messages_logs_the_hand_masked_loss(tmp_path):
    """A whole SFT run on one conversation: its first logged loss is the mean cross-entropy of the
    hand-built assistant tokens under the initial model (system/user/template tokens not in it)."""
    from fastppo.config import SFTConfig
    from fastppo.sft import train_sft
    from transformers import AutoModelForCausalLM

    tok = chat_tokenizer()
    policy = save_policy(tmp_path / "policy", tok, hidden=32, layers=1, heads=2)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    cfg = SFTConfig(data=str(data), model=str(policy), out=str(tmp_path / "sft"), steps=1,
                    batch_size=1, seed=0).check()
    train_sft(cfg)
    logged = json.loads((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    ids, mask = hand_built(tok)
    lm = AutoModelForCausalLM.from_pretrained(policy).float()
    with torch.no_grad():
        logits = lm(torch.tensor([ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    expected = nll[torch.tensor(mask[1:])].mean().item()
    assert logged == pytest.approx(expected, rel=1e-4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATION[:2]}) + "\n")
    with pytest.raises(ValueError, match="no assistant message"):
        train_sft(SFTConfig(data=str(bad), model=str(policy), out=str(tmp_path / "bad"),
                            steps=1, batch_size=1).check())


# ---------------------------------------------------------- conversations as data: files, RM pairs


def test_parquet_and_datasets_directories_read_as_jsonl(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from fastppo.data import read_jsonl, write_jsonl

    rows = [{"prompt": [{"role": "user", "content": "2+2"}], "chosen": "4", "rejected": "5"},
            {"prompt": [{"role": "user", "content": "1+1"}], "chosen": "2", "rejected": "3"}]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = datasets.Dataset.from_list(rows)
    data.to_parquet(str(tmp_path / "pairs.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(train=data, test=data).save_to_disk(str(tmp_path / "splits"))
    expected = read_jsonl(tmp_path / "pairs.jsonl", "rm")
    assert expected == rows
    for path in ("pairs.parquet", "saved", "splits"):
        assert read_jsonl(tmp_path / path, "rm") == rows, path
    datasets.DatasetDict(a=data, b=data).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"holds the splits \['a', 'b'\]"):
        read_jsonl(tmp_path / "two", "rm")
    datasets.Dataset.from_list([{"prompt": "x"}]).to_parquet(str(tmp_path / "short.parquet"))
    with pytest.raises(ValueError, match=r"short.parquet row 0: field 'chosen' must be a string"):
        read_jsonl(tmp_path / "short.parquet", "rm")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cannot be read as Parquet"):
        read_jsonl(tmp_path / "broken.parquet", "ppo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a directory, not a file"):
        read_jsonl(tmp_path / "empty", "ppo")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match=r"needs the datasets package \(pip install datasets\)"):
        read_jsonl(tmp_path / "pairs.parquet", "rm")


def test_rm_conversations_are_rendered_whole_and_scored_at_the_reply_end(tmp_path):
    from fastppo.config import RMConfig
    from fastppo.rm import encode_pairs, train_rm

    tok = chat_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "2+2"}], "chosen": "4",
             "rejected": [{"role": "assistant", "content": "5"}]},
            {"prompt": "plain", "chosen": "a", "rejected": "b"}] * 4
    cfg = RMConfig(data=str(tmp_path / "pairs.jsonl"), model="m", out=str(tmp_path / "rm"),
                   steps=2, batch_size=2)
    chosen, rejected = encode_pairs(tok, rows, cfg)
    whole = lambda side: side[0] + side[1]  # noqa: E731
    assert whole(chosen[0]) == ids_of(tok, "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n4<|im_end|>")
    assert whole(rejected[0]) == ids_of(tok, "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n5<|im_end|>")
    assert chosen[1] == (tok("plain").input_ids, ids_of(tok, "a") + [tok.eos_token_id])
    from fastppo.data import write_jsonl

    write_jsonl(tmp_path / "pairs.jsonl", rows)
    policy = save_policy(tmp_path / "policy", tok, hidden=32, layers=1, heads=2)
    cfg = RMConfig(data=str(tmp_path / "pairs.jsonl"), model=str(policy), out=str(tmp_path / "rm"),
                   steps=2, batch_size=2, eval_fraction=0.25).check()
    _, accuracy = train_rm(cfg)
    assert 0.0 <= accuracy <= 1.0
    with pytest.raises(ValueError, match="row 0 .chosen.: messages need a chat template"):
        encode_pairs(chat_tokenizer(template=None), rows, cfg)


def test_two_ranks_run_the_episodes_of_one_process(chat_run, tmp_path):
    """torchrun, 2 gloo ranks: each rank runs its own rows' episodes (turns keyed by global row), the
    episodes are exchanged with their holes, turn rewards and counts; the run equals one process's."""
    import os
    import signal
    import subprocess

    root, policy = chat_run
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        launcher = [sys.executable, "-m", "fastppo"] if world == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
            "-m", "fastppo"]
        command = ["ppo", "--prompts", str(root / "prompts.jsonl"), "--policy", str(policy),
                   "--env", "envmod_episodes:make", "--out", str(out), "--iterations", "2",
                   "--batch_size", "4", "--mini_batch_size", "2", "--samples_per_prompt", "2",
                   "--advantage_estimator", "grpo", "--max_new_tokens", "6", "--max_turns", "3",
                   "--max_episode_tokens", "48", "--seed", "1", "--lr", "1e-3"]
        env = dict(os.environ, FASTPPO_COLLECTIVE_TIMEOUT_S="60", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen(launcher + command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: nothing left behind
            proc.communicate()
            raise
        assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
        runs[world] = metrics(out)
    for a, b in zip(runs[1], runs[2], strict=True):
        assert b["first_ratio_max_error"] <= 1e-5 and b["world_size"] == 2
        for key in ("env_reward", "turns_per_episode", "model_token_fraction", "response_length",
                    "truncated_fraction", "env_errors"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        for key in ("policy_loss", "kl", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key


@pytest.mark.parametrize("overrides,message", [
    (dict(tools="envmod_episodes:add"), "give env or tools, not both"),
    (dict(env="no colon"), "env must be 'module:function'"),
    (dict(env=None, tools="m:f, bad", reward_fn="m:r"), r"tools\[1\] must be 'module:function'"),
    (dict(max_episode_tokens=4), r"max_episode_tokens \(4\) must be >= max_new_tokens \(6\)"),
    (dict(truncate_prompts=True, max_prompt_length=8), "truncate_prompts does not apply to episodes"),
    (dict(max_turns=0), "max_turns"),
    (dict(tool_timeout=0.0), "tool_timeout"),
])
def test_episode_configs_that_cannot_work_are_refused_by_field(chat_run, overrides, message):
    root, policy = chat_run
    with pytest.raises(ValueError, match=message):
        episode_config(root, policy, "refused", **overrides)


def test_an_environment_that_cannot_start_stops_the_run_naming_it(chat_run, monkeypatch, tmp_path):
    from fastppo.ppo import train_ppo

    root, policy = chat_run
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "envmod_broken.py").write_text(
        "class Broken:\n    def reset(self, row):\n        raise KeyError(row['prompt'])\n"
        "    def step(self, turn):\n        return None, 0.0, True\n")
    with pytest.raises(ValueError, match=r"row 0: environment reset raised KeyError"):
        train_ppo(episode_config(root, policy, "broken", env="envmod_broken:Broken"))
    with pytest.raises(ValueError, match="env.*envmod_missing"):
        train_ppo(episode_config(root, policy, "missing", env="envmod_missing:make"))


def test_an_environment_reads_rows_of_its_own_fields(chat_run, monkeypatch, tmp_path):
    """--env: a prompts row is any JSON object, given whole to reset (no "prompt" field needed)."""
    from fastppo.ppo import train_ppo

    root, policy = chat_run
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "envmod_rows.py").write_text(
        "class FromTask:\n    def reset(self, row):\n        return f\"task {row['task']}\"\n"
        "    def step(self, turn):\n        return None, float(len(turn) % 2), True\n")
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps({"task": i}) + "\n" for i in range(3)))
    cfg = episode_config(root, policy, "rows", env="envmod_rows:FromTask",
                         prompts=str(tmp_path / "tasks.jsonl"), iterations=1)
    train_ppo(cfg)
    assert metrics(cfg.out)[0]["turns_per_episode"] == 1.0

