"""Log-probs and the PPO loss straight from hidden states: `linear_token_logprobs` and
`linear_ppo_loss`, the LM head's matmul fused with the token ops, no (N, V) logits in either direction.

Row chunks (every backend's forward, and linear_ppo_loss everywhere): the rows (tokens) in chunks;
per chunk its logits `hidden_c @ weight.T + bias` (chunk x V, the only vocabulary-sized buffer), the
backend's existing fused row kernels on them (Triton, native C++, or the reference's math), then
`d hidden_c = d logits_c @ weight` and `d weight += d logits_c.T @ hidden_c`. linear_ppo_loss
returns a scalar, so its gradients are computed chunk by chunk during the forward, into the chunk's
own logits, and only scaled in backward (as Liger-Kernel's fused linear cross-entropy does): 3
matmuls of N x H x V, the minimum (2 with a frozen weight, as under LoRA; 1 without gradients).
Chunks: ceil(N / 32) rows (each ~3% of the logits), or as many rows as 64 MiB of float32 logits
hold if that is more (`chunk_rows=` sets it): small batches run in one chunk at full matmul speed,
large ones in chunks. The rollout's forward and the training loss chunk a mini-batch identically,
so their logits, and log-probs, are the same bit for bit (ratio = 1).

linear_token_logprobs' gradient: its outputs are per token, so their gradient is unknown until
backward, and keeping the logits is what this op avoids: backward recomputes them, 4 matmuls in all
(3 with a frozen weight). On CPU ("native") with gradients the vocabulary is tiled instead of the
rows: all N rows per tile, an online softmax over the tiles (running max, sum of exp, sum of
exp x logit per row), a backward that recomputes each tile from the saved log-sum-exp and writes
that tile's rows of d weight directly. Measured on this project's 2-core CPU (1024 x 1024 x 32000,
float32): a GEMM over 64-row chunks is 1.25x slower than the whole product (the weight is packed
again for every chunk), over 2048-column vocabulary tiles it is not. Tiles hold ~4 MiB of float32.

Byte floor: hidden (N x H) and weight (V x H) read once per matmul, their gradients written once;
FLOP floor: 2 N H V per matmul.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from fastppo.kernels._checks import (FLOAT_DTYPES, check_same_device, check_tensor,
                                     check_token_inputs, resolve_backend)
from fastppo.kernels._ppo import (STATS, fused_inputs, ppo_arguments, reference_with_truncation,
                                  summary)
from fastppo.kernels._truncation import check_in_kept_set, check_truncation
from fastppo.kernels.ppo_loss import NativePPOLossFunction, PPOLossFunction
from fastppo.kernels.reference import PPOLossOutput
from fastppo.kernels.token_logprobs import (NativeTokenLogprobsFunction, TokenLogprobsFunction,
                                            token_logprobs)

CHUNKS = 32                     # default: N / 32 rows per chunk (each ~3% of the logits)...
CHUNK_FLOOR_BYTES = 64 * 2**20  # ...or as many rows as 64 MiB of float32 logits hold, if more


def _check_linear(hidden, weight, bias, labels) -> None:
    check_tensor("hidden", hidden, FLOAT_DTYPES, "a floating-point")
    check_tensor("weight", weight, FLOAT_DTYPES, "a floating-point")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be the LM head's (V, H) matrix with V >= 1; got shape "
                         f"{tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape (..., H) with H = weight.shape[1] = "
                         f"{weight.shape[1]}; got {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; "
                         f"got {tuple(labels.shape)}")
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES, "a floating-point")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},); got "
                             f"{tuple(bias.shape)}")
    check_same_device(hidden=hidden, weight=weight, labels=labels,
                      **({} if bias is None else {"bias": bias}))


def _matmul_dtype(hidden, weight) -> torch.dtype:
    """The dtype the LM head's matmul runs in: autocast's when it is on (float16/bfloat16), else the
    promoted dtype of hidden and weight."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in (
            torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return torch.result_type(hidden, weight)


def _stand_in(hidden, weight, labels) -> torch.Tensor:
    """A zero-size tensor of the logits' shape (labels.shape + (V,)), dtype and device, for the
    checks the logits ops share (no memory: an expanded scalar)."""
    return hidden.new_zeros((), dtype=_matmul_dtype(hidden, weight)).expand(*labels.shape,
                                                                           weight.shape[0])


def _chunk_rows(n: int, vocab: int, chunk_rows: int | None) -> int:
    """Rows per chunk: ceil(N / 32), or the rows 64 MiB of float32 logits hold if that is more (a
    small batch runs in one chunk: full-size matmuls, logits no larger than 64 MiB)."""
    if chunk_rows is None:
        floor = CHUNK_FLOOR_BYTES // (4 * vocab)
        return max(1, min(n, max(floor, math.ceil(n / CHUNKS))))
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1 or None; got {chunk_rows!r}")
    return chunk_rows


class _Head:
    """The LM head at the dtype the matmuls run in: autocast's (cast once, as autocast would for
    each call), else the promoted dtype of hidden and weight. Used with autocast off, so that the
    forward and backward recompute the same logits whatever autocast state backward runs under."""

    def __init__(self, hidden, weight, bias):
        self.dtype, self.device = _matmul_dtype(hidden, weight), hidden.device.type
        self.weight = weight.detach().to(self.dtype)
        self.bias = None if bias is None else bias.detach().to(self.dtype)

    def logits(self, hidden_rows):
        return F.linear(hidden_rows.detach().to(self.dtype), self.weight, self.bias)

    def tile_logits(self, hidden, cols: slice):
        """All rows' logits over the vocabulary columns `cols` (hidden already in self.dtype)."""
        return F.linear(hidden, self.weight[cols], None if self.bias is None else self.bias[cols])

    def no_autocast(self):
        return torch.autocast(self.device, enabled=False)


def _accumulate(head, hidden_rows, grad_logits, grad_hidden, grad_weight, grad_bias, rows):
    """d hidden of the chunk's rows, and its share of d weight and d bias (float32 sums)."""
    if grad_hidden is not None:
        grad_hidden[rows] = (grad_logits @ head.weight).to(grad_hidden.dtype)
    if grad_weight is not None:  # float32 operands: no (V, H) temporary in the matmul's dtype
        grad_weight.addmm_(grad_logits.t().float(), hidden_rows.detach().to(head.dtype).float())
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0, dtype=torch.float32)


def _grad_buffers(needs, hidden, weight, bias):
    """Buffers for the gradients autograd asked for (needs: hidden, weight, bias)."""
    return (torch.empty_like(hidden) if needs[0] else None,
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None,
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if needs[2] and bias is not None else None)


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """(N, H) hidden -> (N,) log-probs and entropies, chunk by chunk; backward recomputes each
    chunk's logits. Row passes: the backend's token_logprobs kernels (trunc: their top-k / top-p
    truncation, or None)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy,
                backend, chunk, trunc=None):
        head = _Head(hidden, weight, bias)
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logprobs)
        with head.no_autocast(), torch.no_grad():
            for start in range(0, n, chunk):
                rows = slice(start, min(n, start + chunk))
                out = token_logprobs(head.logits(hidden[rows]), labels[rows],
                                     temperature=temperature, ignore_index=ignore_index,
                                     return_entropy=return_entropy, validate=False, backend=backend,
                                     **_truncation_args(trunc))
                logprobs[rows], entropy[rows] = out if return_entropy else (out, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.head, ctx.chunk, ctx.backend = head, chunk, backend
        ctx.options = (temperature, ignore_index, return_entropy, trunc)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels = ctx.saved_tensors
        head, chunk, backend = ctx.head, ctx.chunk, ctx.backend
        temperature, ignore_index, return_entropy, trunc = ctx.options
        grad_hidden, grad_weight, grad_bias = _grad_buffers(ctx.needs_input_grad, hidden, weight,
                                                            bias)
        n = hidden.shape[0]
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        with_entropy = return_entropy and grad_entropy is not None
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            with head.no_autocast(), torch.enable_grad():
                logits = head.logits(hidden[rows]).requires_grad_()
                if backend == "native":  # the gradient written over the recomputed logits
                    lp, ent = NativeTokenLogprobsFunction.apply(
                        logits, labels[rows], temperature, ignore_index, with_entropy, True, trunc)
                elif backend == "triton":
                    lp, ent = TokenLogprobsFunction.apply(logits, labels[rows], temperature,
                                                          ignore_index, with_entropy, trunc)
                else:
                    out = token_logprobs(logits, labels[rows], temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=with_entropy,
                                         validate=False, backend="torch",
                                         **_truncation_args(trunc))
                    lp, ent = out if with_entropy else (out, None)
                outputs, grads = [lp], [grad_logprobs[rows]]
                if with_entropy:
                    outputs.append(ent)
                    grads.append(grad_entropy[rows])
                (grad_logits,) = torch.autograd.grad(outputs, [logits], grads)
                _accumulate(head, hidden[rows], grad_logits, grad_hidden, grad_weight, grad_bias,
                            rows)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return (grad_hidden, cast(grad_weight, weight), cast(grad_bias, bias)) + (None,) * 7


def _truncation_args(trunc) -> dict:
    return {} if trunc is None else dict(top_k=trunc.top_k, top_p=trunc.top_p)


# ----------------------------------------------------------------------- CPU: vocabulary tiles

VOCAB_TILE_BYTES = 4 * 2**20  # a float32 (N, tile) block of logits


def _vocab_tile(n: int) -> int:
    """Columns per vocabulary tile on CPU: an (N, tile) float32 block of ~4 MiB (in cache), between
    256 and 4096 columns (a multiple of 64)."""
    return max(256, min(4096, VOCAB_TILE_BYTES // (4 * max(n, 1)) // 64 * 64))


def _scaled(logits, temperature):
    """The tile's logits / T in float32 (in place when the matmul gave float32)."""
    z = logits.float()
    return z if temperature == 1.0 else z.div_(temperature)


class TiledLinearTokenLogprobsFunction(torch.autograd.Function):
    """The CPU path: vocabulary tiles instead of row chunks. The matmul of every tile has all N rows
    (ATen's GEMM packs the weight once per pass instead of once per row chunk: measured 1.25x
    faster than 64-row chunks at 1024 x 1024 x 32000), and the softmax is online over the tiles
    (running max, sum of exp, sum of exp x logit, per row). Backward recomputes each tile's logits
    from the saved log-sum-exp and writes that tile's rows of d weight directly."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy):
        head = _Head(hidden, weight, bias)
        n, vocab = hidden.shape[0], weight.shape[0]
        tile = _vocab_tile(n)
        row_max = torch.full((n,), float("-inf"), device=hidden.device)
        sum_exp, sum_exp_z = torch.zeros_like(row_max), torch.zeros_like(row_max)
        picked = torch.zeros_like(row_max)
        valid = labels != ignore_index
        with head.no_autocast(), torch.no_grad():
            h = hidden.detach().to(head.dtype)
            for start in range(0, vocab, tile):
                cols = slice(start, min(vocab, start + tile))
                z = _scaled(head.tile_logits(h, cols), temperature)
                new_max = torch.maximum(row_max, z.amax(-1))
                rescale = torch.exp(row_max - new_max)
                e = torch.sub(z, new_max[:, None]).exp_()  # one temporary per tile
                sum_exp.mul_(rescale).add_(e.sum(-1))
                sum_exp_z.mul_(rescale).add_((e[:, None, :] @ z[:, :, None]).view(-1))
                row_max = new_max
                here = valid & (labels >= cols.start) & (labels < cols.stop)
                rows = here.nonzero().squeeze(-1)
                picked[rows] = z[rows, labels[rows] - cols.start]
        log_sum = row_max + torch.log(sum_exp)
        logprobs = torch.where(valid, picked - log_sum, 0.0)
        entropy = torch.where(valid, log_sum - sum_exp_z / sum_exp, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, log_sum, entropy)
        ctx.head, ctx.tile, ctx.options = head, tile, (temperature, ignore_index)
        ctx.set_materialize_grads(False)
        return logprobs, entropy if return_entropy else torch.zeros_like(entropy)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, log_sum, entropy = ctx.saved_tensors
        head, tile = ctx.head, ctx.tile
        temperature, ignore_index = ctx.options
        grad_hidden, grad_weight, grad_bias = _grad_buffers(ctx.needs_input_grad, hidden, weight,
                                                            bias)
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != ignore_index
        zero = torch.zeros(n, device=hidden.device)
        g_lp = zero if grad_logprobs is None else torch.where(valid, grad_logprobs.float(), 0.0)
        g_h = zero if grad_entropy is None else torch.where(valid, grad_entropy.float(), 0.0)
        # d(g_lp lp + g_h H)/dz_k = [g_lp (onehot_k - p_k) - g_h p_k (log p_k + H)] / T
        shift = entropy - log_sum  # log p_k + H = z_k / T + (H - lse)
        d_hidden = None  # float32 sums over the tiles (grad_hidden itself when float32)
        if grad_hidden is not None:
            d_hidden = grad_hidden.zero_() if grad_hidden.dtype == torch.float32 else torch.zeros(
                hidden.shape, dtype=torch.float32, device=hidden.device)
        with head.no_autocast(), torch.no_grad():
            h = hidden.detach().to(head.dtype)
            for start in range(0, vocab, tile):
                cols = slice(start, min(vocab, start + tile))
                z = _scaled(head.tile_logits(h, cols), temperature)
                p = torch.sub(z, log_sum[:, None]).exp_()
                # in place over z: -(g_lp + g_h (z + H - lse)), then times p
                dz = p.mul_(z.add_(shift[:, None]).mul_(g_h[:, None]).add_(g_lp[:, None]).neg_())
                here = valid & (labels >= cols.start) & (labels < cols.stop)
                rows = here.nonzero().squeeze(-1)
                dz[rows, labels[rows] - cols.start] += g_lp[rows]
                dz = dz.div_(temperature).to(head.dtype)
                if d_hidden is not None and head.dtype == torch.float32:
                    d_hidden.addmm_(dz, head.weight[cols])
                elif d_hidden is not None:  # the product in the matmul's dtype, summed in float32
                    d_hidden.add_((dz @ head.weight[cols]).float())
                if grad_weight is not None:
                    grad_weight[cols] = (dz.t() @ h).float()
                if grad_bias is not None:
                    grad_bias[cols] = dz.sum(0, dtype=torch.float32)
        if grad_hidden is not None and d_hidden is not grad_hidden:
            grad_hidden.copy_(d_hidden)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return (grad_hidden, cast(grad_weight, weight), cast(grad_bias, bias)) + (None,) * 4


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    validate: bool = True,
    backend: str = "auto",
    chunk_rows: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs(hidden @ weight.T + bias, labels, ...)` without materialising the logits.

    Args:
        hidden: (..., H) floating: the last hidden states at the positions whose next token is
            scored. Under torch.autocast the matmuls run in autocast's dtype, as the LM head would.
        weight: (V, H), the LM head's weight (tied to the embedding or not: gradients of both uses
            add up in the shared parameter). bias: (V,) or None.
        labels, temperature, ignore_index, return_entropy, top_k, top_p, validate, backend: as in
            token_logprobs (with top_k / top_p the CPU backward runs row chunks, not vocabulary
            tiles: the threshold needs a whole row).
        chunk_rows: rows per chunk (default: ceil(N / 32), or the rows 64 MiB of float32 logits
            hold if more); the CPU "native" backward tiles the vocabulary instead. See the module
            docstring.

    Returns: float32 log-probs of labels.shape (and the entropy), differentiable in hidden, weight
    and bias. Cost: 1 matmul of N x H x V without gradients, 4 with (3 for a frozen weight).
    Backends: "native" (CPU: row chunks and the C++ row kernels; vocabulary tiles with gradients),
    "triton" (row chunks, the Triton row kernels), "torch" (row chunks, the reference), "auto".
    """
    _check_linear(hidden, weight, bias, labels)
    temperature = check_token_inputs(_stand_in(hidden, weight, labels), labels, temperature,
                                     ignore_index, validate)
    trunc = check_truncation(top_k, top_p)
    trunc = trunc if trunc.active else None
    backend = resolve_backend(backend, hidden.device, native_dtype=_matmul_dtype(hidden, weight))
    shape = labels.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    labels1 = labels.reshape(-1)
    chunk = _chunk_rows(labels1.numel(), weight.shape[0], chunk_rows)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (hidden, weight, bias))
    if backend == "native" and grad and trunc is None:  # CPU backward: vocabulary tiles
        lp, ent = TiledLinearTokenLogprobsFunction.apply(hidden2, weight, bias, labels1, temperature,
                                                         ignore_index, bool(return_entropy))
    else:
        lp, ent = LinearTokenLogprobsFunction.apply(hidden2, weight, bias, labels1, temperature,
                                                    ignore_index, bool(return_entropy), backend,
                                                    chunk, trunc)
    if validate and trunc is not None:
        check_in_kept_set(lp, labels1 != ignore_index, "labels")
    return (lp.view(shape), ent.view(shape)) if return_entropy else lp.view(shape)


class LinearPPOLossFunction(torch.autograd.Function):
    """(N, H) hidden -> the PPO loss and the per-token buffer, chunk by chunk, with the gradients of
    hidden, weight, bias and values computed in the same pass (the loss is a scalar: backward only
    scales them). Row passes: the backend's fused ppo_loss kernels, the gradient written over each
    chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, values, labels, mask, weights, old_lp, adv, old_values,
                returns, ref_lp, opts, native, chunk, needs):
        head = _Head(hidden, weight, bias)
        n = hidden.shape[0]
        grad_hidden, grad_weight, grad_bias = _grad_buffers(needs, hidden, weight, bias)
        grad_values = torch.empty_like(values) if needs[3] else None
        function = NativePPOLossFunction if native else PPOLossFunction
        opts = dataclasses.replace(opts, inplace_backward=True)  # into our own logits chunk
        loss, stats = torch.zeros((), dtype=torch.float64, device=hidden.device), []
        pick = lambda t, rows: None if t is None else t[rows]  # noqa: E731
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            with head.no_autocast(), torch.enable_grad():
                logits = head.logits(hidden[rows]).requires_grad_(any(needs))
                v = None if values is None else values[rows].detach().requires_grad_(needs[3])
                chunk_loss, chunk_stats = function.apply(
                    logits, v, labels[rows], mask[rows], weights[rows], old_lp[rows], adv[rows],
                    pick(old_values, rows), pick(returns, rows), pick(ref_lp, rows), opts)
                if any(needs):
                    wrt = [logits] + ([v] if needs[3] else [])
                    grads = torch.autograd.grad(chunk_loss, wrt)
                    _accumulate(head, hidden[rows], grads[0], grad_hidden, grad_weight, grad_bias,
                                rows)
                    if needs[3]:
                        grad_values[rows] = grads[1]
            loss += chunk_loss.detach().double()
            stats.append(chunk_stats.detach())
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_values)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        stats = torch.cat(stats, 1) if stats else torch.zeros((len(STATS), 0), device=hidden.device)
        ctx.mark_non_differentiable(stats)
        return loss.float(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_hidden, grad_weight, grad_bias, grad_values = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = lambda g, dtype=None: None if g is None else (  # noqa: E731
            grad_loss.to(g.dtype) * g).to(dtype or g.dtype)
        return (scale(grad_hidden), scale(grad_weight, weight_dtype),
                scale(grad_bias, bias_dtype), scale(grad_values)) + (None,) * 12


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    value_clip: float | None = 0.2,
    vf_coef: float = 0.1,
    entropy_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    sampler_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    allow_outside_kept: bool = False,
    reduction: str = "token-mean",
    backend: str = "auto",
    chunk_rows: int | None = None,
) -> PPOLossOutput:
    """`ppo_loss(hidden @ weight.T + bias, labels, ...)` without materialising the logits: every
    option, reduction and output field of `ppo_loss` (see it), with hidden (..., H), weight (V, H)
    and bias (V,) in place of the logits. Differentiable in hidden, weight, bias and values.

    Cost: 3 matmuls of N x H x V with gradients (computed during the forward: the loss is a
    scalar), 2 for a frozen weight, 1 without gradients; "triton" and "native" run the fused
    ppo_loss row kernels on each chunk. backend="torch" is the reference: linear_token_logprobs'
    log-probs and entropies (4 matmuls), then the reference's per-token terms.
    """
    _check_linear(hidden, weight, bias, labels)
    opts, tensors, labels = ppo_arguments(_stand_in(hidden, weight, labels),
                                          locals())  # locals(): the arguments, by name
    backend = resolve_backend(backend, hidden.device, native_dtype=_matmul_dtype(hidden, weight))
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    chunk = _chunk_rows(labels.numel(), weight.shape[0], chunk_rows)
    if backend == "torch":  # the reference: log-probs and entropies, then the per-token terms
        lp, entropy = linear_token_logprobs(hidden2, weight, labels.reshape(-1), bias=bias,
                                            temperature=opts.temperature, return_entropy=True,
                                            top_k=opts.top_k, top_p=opts.top_p, validate=False,
                                            backend=backend, chunk_rows=chunk)
        return reference_with_truncation(lp.view(labels.shape), entropy.view(labels.shape), mask,
                                         opts, tensors)

    weights, advantages = fused_inputs(mask, opts, old_logprobs, advantages, sampler_logprobs)
    flat = lambda t, dtype=None: None if t is None else t.reshape(-1).to(  # noqa: E731
        dtype or t.dtype).contiguous()
    values1 = flat(values)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad
                  for t in (hidden2, weight, bias, values1))
    loss, stats = LinearPPOLossFunction.apply(
        hidden2, weight, bias, values1, flat(labels), flat(mask), flat(weights),
        flat(old_logprobs), flat(advantages), flat(old_values), flat(returns), flat(ref_logprobs),
        opts, backend == "native", chunk, needs)
    return summary(loss, stats, mask, weights, old_logprobs, values, opts)
