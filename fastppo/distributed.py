"""Running under torchrun: the process group, which rows of a global batch are this rank's, and the
few collectives the trainers need. Without torchrun (no WORLD_SIZE in the environment, or 1) every
function here is the single-process identity, so the trainers have one code path.

The global batch does not depend on the world size: `batch_size` and `mini_batch_size` stay global
and rank r of N takes rows [r * n, (r + 1) * n) of each, n = size / N. Collectives time out after
`TIMEOUT` (a rank that died makes the others fail within it rather than hang for torch's default
10 or 30 minutes).
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import warnings

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("FASTPPO_COLLECTIVE_TIMEOUT_S", 300)))


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one that prints, writes metrics, plots and the consolidated checkpoint."""
    return rank() == 0


def requested_world() -> int:
    """The world size torchrun asked for (1 without torchrun), known before the group starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def group(device: str):
    """The process group for the block (torchrun; nothing otherwise), ended after it unless it was
    running already: a trainer inside a pipeline keeps the pipeline's. Yields this rank's device."""
    running = dist.is_initialized()
    try:
        yield setup(device)
    except BaseException:
        if not running:
            teardown(wait=False)  # the others fail by their collective timeout
        raise
    if not running:
        teardown()


def setup(device: str) -> str:
    """Start the process group when torchrun asked for more than one process (NCCL on CUDA, one
    device per local rank; gloo on CPU) and return this rank's device. Idempotent."""
    if requested_world() == 1:
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                **({"device_id": torch.device(device)} if cuda else {}))
    return device


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def teardown(wait: bool = True) -> None:
    """End the process group; with `wait`, once every rank is done with it (a rank that tore its
    connections down while a peer still had traffic in flight could abort that peer)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def check_divides(**sizes: int) -> None:
    """Each global size splits evenly over the ranks, else a ValueError naming it (before any work)."""
    n = requested_world()
    for name, size in sizes.items():
        if size % n:
            raise ValueError(f"{name} ({size}) must be a multiple of the number of processes ({n}): "
                             "it is the global size, split evenly over the ranks")


def my_rows(rows: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global list of rows: its contiguous 1/N."""
    n = len(rows) // world()
    return rows[rank() * n:(rank() + 1) * n]


def sum_over_ranks(*tensors: torch.Tensor) -> None:
    """In-place sum over the ranks (one all-reduce per tensor); nothing on one process."""
    if world() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def summed(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` summed over the ranks."""
    t = t.clone()
    sum_over_ranks(t)
    return t


def share_of_mean(local_sum: torch.Tensor, global_count) -> torch.Tensor:
    """This rank's term of a mean over the global batch: its entries' sum over the global count,
    times the world size, because FSDP averages the ranks' gradients (their sum / N). The averaged
    gradient is then the single-process gradient of the mean, whatever the world size."""
    return local_sum / global_count * world()


def max_over_ranks(value: float, device) -> float:
    if world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The ranks' (n, ...) tensors of equal shape, concatenated in rank order: the global rows."""
    if world() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def decoder_layers(lm) -> torch.nn.ModuleList:
    """The causal LM's stack of decoder layers (`layers` in Llama/Qwen2, `h` in GPT-2): the longest
    ModuleList under its backbone."""
    lists = [m for m in lm.base_model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(lm).__name__}: no list of decoder layers found to shard")
    return max(lists, key=len)


def shard(model: torch.nn.Module, lm) -> None:
    """FSDP2 on `model` (whose causal LM is `lm`): one fully_shard per decoder layer, then the root
    (embeddings, final norm, LM head and any head of `model` go with it). The parameters become
    DTensors sharded over the ranks; each forward gathers a layer's weights and frees them after."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(lm):
        fully_shard(layer)
    fully_shard(model)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Every FSDP2 parameter of `model` whole on every rank for the block, sharded again after: for
    generation, one all-gather per layer for the whole rollout instead of one per layer per token.
    It costs the whole model's weights per rank while it lasts (no gradients, no optimizer state).
    FSDP2 learns which module is its root from the first forward, so `model` must have run one
    (see fastppo.ppo). Nothing on one process."""
    if world() == 1:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    layers = [m for m in units if m is not model]  # the root is not resharded after forward anyway
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model: torch.nn.Module, *, main_only: bool = False) -> dict[str, torch.Tensor]:
    """`model`'s whole state dict, gathered from the shards on every rank (a collective; on one
    process, the state dict itself). main_only: gathered onto rank 0 only, in CPU memory (the
    others get an empty dict): what rank 0 needs to write the consolidated model."""
    if world() == 1:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=main_only))


# ------------------------------------------------------------------------------ sharded checkpoints
# Under torchrun each rank writes the model and optimizer as it holds them (its shards) with
# torch.distributed.checkpoint, in its safetensors format (HuggingFaceStorageWriter): every file
# records the offsets of its pieces in its header, so the checkpoint loads at any world size, 1
# included, without a pickle (DCP's default format keeps its metadata in one). Non-tensor state
# (the optimizer's hyperparameters) goes in the trainer state's JSON.


def _flat(model_state: dict, optimizer_state: dict) -> dict[str, torch.Tensor]:
    """One flat dict of tensors: model/<name> and optimizer/<parameter name>/<state key>."""
    flat = {f"model/{name}": t for name, t in model_state.items()}
    for name, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name}/{key} is a {type(value).__name__}, not a "
                                "tensor: sharded checkpoints hold tensors only")
            flat[f"optimizer/{name}/{key}"] = value
    return flat


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """(this rank's model and optimizer tensors as save_shards takes them, the optimizer's
    param_groups with parameters by name). No communication."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return _flat(model_state, optimizer_state), optimizer_state["param_groups"]


def save_shards(tensors: dict[str, torch.Tensor], directory) -> None:
    """Every rank writes its pieces of `tensors` into `directory` (one file per rank; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True))


def load_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory,
                param_groups: list) -> None:
    """Load what save_shards wrote, at any world size (every rank reads the pieces it now holds), into
    `model` and `optimizer`; `param_groups` as sharded_state returned them. A checkpoint of another
    model is a ValueError naming what is missing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # initialises the moments
    flat = _flat(model_state, optimizer_state)
    try:
        with warnings.catch_warnings():  # one process: "assuming the intent is ... single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(directory)),
                     no_dist=world() == 1)
    except (CheckpointException, RuntimeError, KeyError, AssertionError) as e:
        raise ValueError(f"checkpoint {directory}: the sharded checkpoint does not fit this model "
                         f"({str(e).strip().splitlines()[-1][:300]})") from None
    model_state = {name: flat[f"model/{name}"] for name in model_state}
    optimizer_state = {
        "state": {name: {key: flat[f"optimizer/{name}/{key}"] for key in entry}
                  for name, entry in optimizer_state["state"].items()},
        "param_groups": param_groups}
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def agree(ok: bool) -> bool:
    """True when `ok` holds on every rank (one all-reduce under torchrun)."""
    return all_finite([torch.tensor(0.0 if ok else math.inf)])


def all_finite(tensors) -> bool:
    """Every entry of every tensor (this rank's shard of a DTensor) is finite, on every rank: one
    device sync and, under torchrun, one all-reduce."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    ok = torch.stack([torch.isfinite(t).all() for t in local]).all() if local else torch.tensor(True)
    flag = ok.to(torch.int64).reshape(1)
    if world() > 1:
        flag = flag.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict) -> None:
    """Load an optimizer state with parameters by name (get_optimizer_state_dict's format) into a
    model sharded over any number of ranks, or an optimizer.state_dict() (parameters by position:
    a single-process checkpoint)."""
    named = bool(state.get("param_groups")) and all(
        isinstance(p, str) for group in state["param_groups"] for p in group["params"])
    if not named and world() == 1:
        optimizer.load_state_dict(state)
        return
    if not named:  # positions -> names: the optimizer was built on model.parameters(), in order
        names = [name for name, _ in model.named_parameters()]
        state = {"state": {names[int(i)]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                  for g in state["param_groups"]]}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], *,
                         strict: bool = True) -> None:
    """Load a whole state dict (every rank holds it) into `model`, sharded or not. strict=False:
    `state` may hold only some of the weights (a LoRA adapter and the heads)."""
    if world() == 1:
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
