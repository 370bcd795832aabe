"""The whole pipeline of the seed article on the user's data: SFT -> reward model on ranked pairs -> PPO.
(The built-in demo that runs it on a toy task is fastppo.demo.)"""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field, fields
from pathlib import Path

from fastppo import distributed
from fastppo.config import PPOConfig, RMConfig, RunOptions, SFTConfig, check_fields
from fastppo.data import read_jsonl
from fastppo.preflight import check_model_dir
from fastppo.run import check_config, check_start
from fastppo.ppo import train_ppo
from fastppo.rm import train_rm
from fastppo.sft import train_sft


@dataclass
class PipelineConfig(RunOptions):
    """The pipeline's seed, device, dtype and gradient_checkpointing are every stage's."""
    model: str
    """A Hugging Face causal-LM directory (with tokenizer) to start from."""
    sft_data: str
    """JSONL of {"prompt", "response"}."""
    rm_data: str
    """JSONL of {"prompt", "chosen", "rejected"}."""
    prompts: str
    """JSONL of {"prompt"} for PPO."""
    sft_steps: int = 300
    """SFT optimizer steps."""
    rm_steps: int = 300
    """Reward-model optimizer steps."""
    ppo_iterations: int = 40
    """PPO iterations."""
    sft: dict = field(default_factory=dict)
    """Other SFTConfig fields for the SFT stage, e.g. {"lr": 0.001, "batch_size": 16}."""
    rm: dict = field(default_factory=dict)
    """Other RMConfig fields for the reward-model stage."""
    ppo: dict = field(default_factory=dict)
    """Other PPOConfig fields for the PPO stage, e.g. {"kl_coef": 0.1, "top_p": 0.9}."""
    _: KW_ONLY
    out: str = "runs/pipeline"

    def check(self) -> "PipelineConfig":
        """The pipeline's own fields (the stages' are checked by _stage)."""
        check_fields(self)
        return self


def _stage(cls, overrides: dict, stage: str, **wired):
    """The stage's config, checked (fastppo.run.check_config): what the pipeline wires, plus the
    user's overrides of other fields."""
    names = {f.name for f in fields(cls)}
    for key in overrides:
        if key not in names or key in wired:
            raise ValueError(f"{stage}: {key!r} is not a {cls.__name__} field the pipeline lets you "
                             f"set (the pipeline sets {', '.join(sorted(wired))})")
    try:
        cfg = cls(**wired, **overrides)
        check_config(cfg)
    except (TypeError, ValueError) as e:  # "sft: lr must be > 0; got -1"
        raise ValueError(f"{stage}: {e}") from None
    return cfg


def run_pipeline(cfg: PipelineConfig) -> dict:
    """SFT -> RM -> PPO. All three stages are checked before any work starts (and not again when
    each starts)."""
    out = Path(cfg.check().out)
    common = dict(seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                  gradient_checkpointing=cfg.gradient_checkpointing)
    sft_checkpoint, rm_checkpoint = out / "sft" / "checkpoint", out / "rm" / "checkpoint"
    sft_cfg = _stage(SFTConfig, cfg.sft, "sft", data=cfg.sft_data, model=cfg.model,
                     out=str(out / "sft"), steps=cfg.sft_steps, **common)
    rm_cfg = _stage(RMConfig, cfg.rm, "rm", data=cfg.rm_data, model=str(sft_checkpoint),
                    out=str(out / "rm"), steps=cfg.rm_steps, **common)
    ppo_cfg = _stage(PPOConfig, cfg.ppo, "ppo", prompts=cfg.prompts, policy=str(sft_checkpoint),
                     reward_model=str(rm_checkpoint), out=str(out / "ppo"),
                     iterations=cfg.ppo_iterations, **common)
    for path, kind in ((cfg.sft_data, "sft"), (cfg.rm_data, "rm"), (cfg.prompts, "ppo")):
        read_jsonl(path, kind)  # a malformed line stops the pipeline before SFT, not after it
    check_model_dir(cfg.model, "model")
    for stage in (sft_cfg, rm_cfg, ppo_cfg):  # resumability, overwrite, locks, writability, device
        check_start(stage)
    with distributed.group(cfg.device):  # under torchrun: one process group for the three stages
        sft = train_sft(sft_cfg, checked=True)
        rm, accuracy = train_rm(rm_cfg, checked=True)
        ppo = train_ppo(ppo_cfg, checked=True)
    return {"sft": sft, "rm": rm, "ppo": ppo, "rm_accuracy": accuracy}
