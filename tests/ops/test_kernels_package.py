"""fastppo.kernels stands alone: it imports nothing of the engine, loads neither transformers nor the
config library, and its public API is the documented one."""
import ast
import subprocess
import sys
from pathlib import Path

import fastppo.kernels

KERNELS = Path(fastppo.kernels.__file__).parent
PUBLIC = ["token_logprobs", "kl_penalty", "kl_rewards", "gae", "reward_to_go", "masked_whiten",
          "ppo_loss", "linear_token_logprobs", "linear_ppo_loss", "group_advantages",
          "truncation_threshold", "PPOLossOutput"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_under_kernels_imports_the_engine():
    for path in sorted(KERNELS.glob("*.py")):
        engine = {m for m in imported_modules(path)
                  if m.startswith("fastppo") and m != "fastppo" and not m.startswith("fastppo.kernels")}
        assert not engine, f"{path.name} imports {sorted(engine)}"


def test_importing_the_kernels_loads_no_engine_dependency():
    code = ("import sys, fastppo.kernels as k; k.token_logprobs; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'jsonargparse') "
            "or (m.startswith('fastppo.') and not m.startswith('fastppo.kernels'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_public_api():
    assert fastppo.kernels.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(fastppo.kernels, name).__module__.startswith("fastppo.kernels.")
