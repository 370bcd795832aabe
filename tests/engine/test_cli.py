"""The `fastppo` command end to end, and its answers to bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def fastppo(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastppo.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_commands(small_run, tmp_path):
    out, _ = small_run
    data = out / "data"
    proc = fastppo("sft", "--data", data / "sft.jsonl", "--model", out / "base", "--out",
                   tmp_path / "sft", "--steps", 3, "--batch_size", 4, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "rm.yaml").write_text(f"data: {data / 'rm.jsonl'}\nmodel: {tmp_path / 'sft' / 'checkpoint'}\n"
                                      f"out: {tmp_path / 'rm'}\nsteps: 3\nbatch_size: 4\n")
    proc = fastppo("rm", "--config", tmp_path / "rm.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out pairwise accuracy" in proc.stdout
    proc = fastppo("ppo", "--prompts", data / "prompts.jsonl", "--policy", tmp_path / "sft" / "checkpoint",
                   "--reward_model", tmp_path / "rm" / "checkpoint", "--out", tmp_path / "ppo",
                   "--iterations", 2, "--batch_size", 4, "--mini_batch_size", 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2
    proc = fastppo("pipeline", "--model", out / "base", "--sft_data", data / "sft.jsonl", "--rm_data",
                   data / "rm.jsonl", "--prompts", data / "prompts.jsonl", "--out", tmp_path / "pipe",
                   "--sft_steps", 2, "--rm_steps", 2, "--ppo_iterations", 1, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert isinstance(result["rm_accuracy"], float) and result["ppo"].endswith("checkpoint")
    proc = fastppo("demo", "--out", tmp_path / "demo", "--sft_steps", 5, "--rm_steps", 5,
                   "--ppo_iterations", 1, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "oracle score, PPO policy" in proc.stdout
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["seconds"] > 0


BAD_INPUT = [
    (["ppo", "--prompts", "p", "--policy", "x", "--reward_model", "y", "--batch_size", "4",
      "--mini_batch_size", "8"], "mini_batch_size (8) must not exceed batch_size (4)"),
    (["ppo", "--prompts", "p", "--policy", "x", "--reward_model", "y", "--top_p", "0"],
     "top_p must be in (0, 1]"),
    (["sft", "--data", "d", "--model", "m", "--learning_rate", "1"], "unrecognized arguments"),
    (["sft", "--data", "d", "--model", "m", "--steps", "two"], 'Parser key "steps"'),
    (["rm", "--data", "missing.jsonl", "--model", "m"], "rm data file missing.jsonl does not exist"),
    (["demo", "--ppo_iterations", "0"], "ppo_iterations must be >= 1; got 0"),
    (["demo", "--task", "chess"],
     "fastppo demo: error: Parser key \"task\": Expected a typing.Literal['sentiment', 'arithmetic', "
     "'tools']"),
    (["ppo", "--prompts", "p", "--policy", "x", "--reward_model", "y", "--rollout_engine", "x"],
     "fastppo ppo: error: Parser key \"rollout_engine\": Expected a typing.Literal['hf', 'vllm']. "
     "Got value: x"),
    (["sft", "--data", "d", "--model", "m", "--dtype", "fp16"], 'Parser key "dtype"'),
    (["ppo", "--prompts", "p", "--policy", "x"], "give reward_model, reward_fn, env or several"),
    (["sft", "--config", "c.yaml"], "learning_rate"),  # an unknown key in a YAML config
]


def run_cases(argvs, cwd):
    """[(exit code, stderr)] of `fastppo ARGV` for each ARGV, run in one process (cli_cases.py)."""
    (cwd / "cases.json").write_text(json.dumps([[str(a) for a in argv] for argv in argvs]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("cli_cases.py")),
                           str(cwd / "cases.json")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(r["code"], r["stderr"]) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-bad-input")
    (tmp / "c.yaml").write_text("data: d\nmodel: m\nlearning_rate: 0.1\n")
    return dict(zip((tuple(a) for a, _ in BAD_INPUT), run_cases([a for a, _ in BAD_INPUT], tmp)))


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a[-2:]) for a, _ in BAD_INPUT])
def test_cli_bad_input(bad_input, args, message):
    # Refused by the parser or by check(): one line on stderr, exit code 2, no traceback.
    code, stderr = bad_input[tuple(args)]
    assert code == 2, stderr[-2000:]
    assert message in stderr
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0, stderr


def model_dir(tmp_path, small_run, kind):
    """A directory for the error cases: the demo's tokenizer with a config of `kind`."""
    from transformers import AutoTokenizer, BertConfig, T5Config

    out, _ = small_run
    path = tmp_path / kind
    path.mkdir()
    if kind == "no_tokenizer":
        (path / "config.json").write_text((out / "base" / "config.json").read_text())
        return path
    if kind == "rm_two_labels":  # a two-class sequence classifier
        path.rmdir()
        shutil.copytree(out / "rm" / "checkpoint", path)
        config = json.loads((path / "config.json").read_text())
        config.update(id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
        (path / "config.json").write_text(json.dumps(config))
        return path
    if kind == "rm_other_tokenizer":  # the reward model, with one more token in its vocabulary
        path.rmdir()
        shutil.copytree(out / "rm" / "checkpoint", path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.add_tokens(["splendid"])
        tokenizer.save_pretrained(path)
        return path
    config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8) if kind == "bert" else T5Config(
        vocab_size=40, d_model=8, d_ff=8, num_layers=1, num_heads=2, d_kv=4)
    config.save_pretrained(path)
    AutoTokenizer.from_pretrained(out / "base").save_pretrained(path)
    return path


ERRORS = [  # (arguments, what stderr must say); {out}, {tmp} and {bad:KIND} are filled in
    (["sft", "--model", "{tmp}/nowhere"], "model {tmp}/nowhere: no such directory"),
    (["sft", "--model", "{bad:no_tokenizer}"], "no tokenizer files"),
    (["sft", "--model", "{bad:bert}"], "a 'bert' model is an encoder, not a causal language model"),
    (["rm", "--model", "{bad:t5}"], "a 't5' model is an encoder-decoder, not a causal language"),
    (["ppo", "--reward_model", "{out}/sft/checkpoint"], "not a fastppo reward model (an SFT "),
    (["ppo", "--reward_model", "{bad:rm_two_labels}"], "num_labels=2; a reward model gives one"),
    (["sft", "--device", "tpu9"], "device must be a torch device such as 'cpu' or 'cuda:0'"),
    (["sft", "--data", "{tmp}/latin1.jsonl"], "latin1.jsonl:2: not UTF-8 text (byte 0xe9"),
    (["pipeline", "--ppo", '{"klcoef": 1}'], "ppo: 'klcoef' is not a PPOConfig field"),
    (["ppo", "--gamma", "1.5"], "gamma must be in [0, 1]; got 1.5"),
    (["ppo", "--kl_target", "0"], "kl_target must be > 0; got 0"),
    (["sft", "--lr", "-1"], "lr must be > 0; got -1.0"),
    (["rm", "--eval_fraction", "1"], "eval_fraction must be in (0, 1); got 1"),
    (["ppo", "--reward_model", "{bad:rm_other_tokenizer}"],
     "its tokenizer differs from the policy's (vocabulary: 48 vs 49 entries)"),
    (["ppo", "--max_new_tokens", "200"],
     "the longest prompt + max_new_tokens is 204 tokens, more than the 128 positions of"),
    (["ppo", "--max_prompt_length", "3"], "prompt 0 has 4 tokens, more than max_prompt_length=3"),
    (["ppo", "--truncate_prompts", "true"], "truncate_prompts needs max_prompt_length >= 1"),
]
if not __import__("torch").cuda.is_available():
    ERRORS.append((["sft", "--device", "cuda"], "CUDA is not available on this machine"))


@pytest.fixture(scope="module")
def error_cases(small_run, tmp_path_factory):
    """Every ERRORS case's command run (in one process, tests/engine/cli_cases.py): the case's
    arguments -> (exit code, stderr)."""
    out, _ = small_run
    tmp = tmp_path_factory.mktemp("cli-errors")
    data = out / "data"
    (tmp / "latin1.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n'
                                       b'{"prompt": "caf\xe9", "response": "b"}\n')
    defaults = {
        "sft": ["--data", str(data / "sft.jsonl"), "--model", str(out / "base")],
        "rm": ["--data", str(data / "rm.jsonl"), "--model", str(out / "sft" / "checkpoint")],
        "ppo": ["--prompts", str(data / "prompts.jsonl"), "--policy", str(out / "sft" / "checkpoint"),
                "--reward_model", str(out / "rm" / "checkpoint")],
        "pipeline": ["--model", str(out / "base"), "--sft_data", str(data / "sft.jsonl"), "--rm_data",
                     str(data / "rm.jsonl"), "--prompts", str(data / "prompts.jsonl")],
    }

    def fill(text):
        if text.startswith("{bad:"):
            kind = text[5:-1]
            return str(tmp / kind if (tmp / kind).exists() else model_dir(tmp, small_run, kind))
        return text.replace("{out}", str(out)).replace("{tmp}", str(tmp))
    argvs = []
    for i, (args, _) in enumerate(ERRORS):
        args = [fill(a) for a in args]
        argvs.append([args[0], *defaults[args[0]], *args[1:], "--out", str(tmp / f"run{i}")])
    results = run_cases(argvs, tmp)
    return {tuple(args): (code, stderr, fill) for (args, _), (code, stderr) in zip(ERRORS, results)}


@pytest.mark.parametrize("args,message", ERRORS, ids=[" ".join(a[:3]) for a, _ in ERRORS])
def test_errors_a_user_understands(error_cases, args, message):
    # One line on stderr, exit code 2, no traceback.
    code, stderr, fill = error_cases[tuple(args)]
    assert code == 2, stderr[-2000:]
    assert fill(message) in stderr
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0, stderr


def test_a_diverging_run_stops_with_one_line(small_run, tmp_path):
    out, _ = small_run
    proc = fastppo("sft", "--data", out / "data" / "sft.jsonl", "--model", out / "base", "--out",
                   tmp_path / "run", "--steps", 5, "--batch_size", 4, "--save_every", 1, "--lr",
                   1e30, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "fastppo sft: stopped: SFT gradient norm is not finite at step 1" in proc.stderr
    assert f"The last good checkpoint is in {tmp_path / 'run' / 'checkpoint'}" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
