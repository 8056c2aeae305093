"""Expert dispatch ops: plan the (token, slot) -> expert-row layout, permute, unpermute.

The numerics and layout are those of ``moe_route.reference`` ("Dispatch"). Everything is sized for
the worst case (``R = T*k + E*(block_size-1)`` rows), so no op reads back to the host and all are
CUDA-graph capturable.

``permute`` and ``unpermute`` are differentiable (in x, y and the weights; the plan is integer).
Their backwards are each other: the gradient of ``permute`` sums each token's rows with
``unpermute`` (weights 1, fp32 in slot order), the gradient of ``unpermute`` in y scatters the
weighted output gradient back to the rows with ``permute``, and in the weights it is the dot
product of each slot's row with its token's output gradient (fp32).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad

from moe_route import _loader, reference
from moe_route._checks import check_bool

__all__ = ["DispatchPlan", "dispatch_plan", "permute", "unpermute"]

# The eager fast paths (csrc/python.cpp): the ops below autograd, or None for a call the checked
# path below must take. They save 4-8 us a call, most of a decode-sized op.
_native = _loader.native
_plan_fast = _native.dispatch_plan_fast if _native is not None else None
_permute_fast = _native.permute_fast if _native is not None else None
_unpermute_fast = _native.unpermute_fast if _native is not None else None
_Tensor = torch.Tensor
_compiling = torch.compiler.is_compiling


class DispatchPlan(NamedTuple):
    """Where each (token, slot) pair goes. All tensors int64 on the ids' device.

    row_slot [R]: the slot ``t*k + j`` feeding each expert-contiguous row, -1 for padding rows and
        unused tail rows. ``row_token`` derives each row's token from it.
    expert_offsets [E+1]: first row of each expert; ``expert_offsets[E]`` rows are in use.
    counts [E]: real (unpadded) rows per expert.
    slot_row [T*k]: the row of each slot, -1 where the id was outside [0, E) (dropped).
    k: slots per token.

    Build it with ``dispatch_plan``. On the CPU, ``permute`` and ``unpermute`` check the indices
    they follow and raise ValueError on a plan that does not fit their tensors. On CUDA a check
    would cost a host sync: the kernels skip ``slot_row`` entries outside ``[0, R)`` as dropped
    slots instead, so a corrupted plan gives wrong rows but touches no memory outside the tensors.
    """

    row_slot: torch.Tensor
    expert_offsets: torch.Tensor
    counts: torch.Tensor
    slot_row: torch.Tensor
    k: int

    @property
    def row_token(self) -> torch.Tensor:
        """Token of each row ``[R]`` int64, -1 for padding and unused rows: ``permute`` as an index.

        ``permute(x, plan)[r]`` is ``x[row_token[r]]`` where ``row_token[r] >= 0`` and zeros
        elsewhere, so a GEMM that gathers its rows by itself can read ``x`` through it instead of a
        permuted copy. One elementwise op on the plan's device, no host sync.
        """
        # floor(-1 / k) == -1: padding stays -1 without a select.
        return self.row_slot.div(max(self.k, 1), rounding_mode="floor")


def dispatch_plan(ids: torch.Tensor, num_experts: int, block_size: int = 1) -> DispatchPlan:
    """Stable counting sort of ``ids [T, k]`` (int32/int64) by expert.

    Inside an expert, rows keep slot order (token order, then slot). ``block_size`` pads each
    expert's rows to a multiple of it with -1 rows (for block-tiled GEMMs). Ids outside
    ``[0, num_experts)`` (expert-parallel sentinels, -1 padding) get no row. Deterministic.
    With ``block_size > 1`` most rows of a small-T plan are unused tail; ``permute(...,
    zero_tail=False)`` skips them.
    """
    k = ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 0
    if (k == 0 or type(num_experts) is not int or type(block_size) is not int
            or not 1 <= num_experts <= reference.MAX_EXPERTS
            or not 1 <= block_size <= reference.MAX_BLOCK_SIZE):
        reference.check_dispatch_args(ids, num_experts, block_size)  # names the bad argument
    if _plan_fast is not None and type(ids) is _Tensor and not _compiling():
        out = _plan_fast(ids, num_experts, block_size)
        if out is not None:
            return DispatchPlan(*out, k=k)
    out = _call("dispatch_plan", ids, (ids, num_experts, block_size), reference.dispatch_plan)
    return DispatchPlan(*out, k=k)


def permute(x: torch.Tensor, plan: DispatchPlan, *, zero_tail: bool = True) -> torch.Tensor:
    """Expert-contiguous copy ``[R, H]`` of ``x [T, H]`` (same dtype); zero rows for padding.

    ``zero_tail=False`` leaves the unused tail, rows at and past ``plan.expert_offsets[E]``,
    unwritten (their contents are whatever the allocator returned); block-padding rows inside the
    experts' segments are still zeros. A GEMM over the plan's offsets never reads the tail, and
    with ``block_size > 1`` it is most of the output at small T: the plan is sized for the worst
    case, ``R = T*k + E*(block_size-1)`` rows (T=1, k=8, E=256, block 64: 16136 rows, at most 512
    in use), and zeroing it costs a memset of R rows on every call. In training, keep that tail
    out of any dense product over all R rows: its contents times a zero gradient can be NaN.
    """
    if (_permute_fast is not None and type(x) is _Tensor and type(plan) is DispatchPlan
            and type(plan.k) is int and (zero_tail is True or zero_tail is False)
            and _forward_ad._current_level < 0 and not _compiling()):
        try:
            out = _permute_fast(x, plan.row_slot, plan.slot_row, plan.k,
                                None if zero_tail else plan.expert_offsets)
        except TypeError:  # a plan edited to hold other than tensors: explained below
            out = None
        if out is not None:
            return out
    _check_call("permute", "x", x, plan)
    if x.dim() == 2 and x.shape[0] * plan.k != plan.slot_row.shape[0]:
        raise ValueError(f"permute: x must have the plan's T={plan.slot_row.shape[0] // plan.k} "
                         f"rows (one per token), got shape {tuple(x.shape)}")
    offsets = None if check_bool("permute", "zero_tail", zero_tail) else plan.expert_offsets
    _same_device("permute", "x", x, row_slot=plan.row_slot, slot_row=plan.slot_row,
                 expert_offsets=offsets)
    return _call("permute", x, (x, plan.row_slot, plan.slot_row, plan.k, offsets),
                 lambda x, row_slot, slot_row, k, _: reference.permute(x, row_slot, k))


def unpermute(y: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y[row of (t, j)]`` as ``[T, H]`` in y's dtype.

    Accumulates in fp32 in slot order (j = 0..k-1) without atomics: deterministic, and on the CPU
    bit-identical to the reference. Dropped slots contribute nothing. Weights of any float dtype
    are read as fp32.
    """
    if (_unpermute_fast is not None and type(y) is _Tensor and type(weights) is _Tensor
            and type(plan) is DispatchPlan and type(plan.k) is int
            and _forward_ad._current_level < 0 and not _compiling()):
        try:
            out = _unpermute_fast(y, plan.row_slot, plan.slot_row, plan.k, weights)
        except TypeError:  # a plan edited to hold other than tensors: explained below
            out = None
        if out is not None:
            return out
    _check_call("unpermute", "y", y, plan, weights=weights)
    if y.dim() == 2 and y.shape[0] != plan.row_slot.shape[0]:
        raise ValueError(f"unpermute: y must have the plan's R={plan.row_slot.shape[0]} rows "
                         f"(one per row of permute's output), got shape {tuple(y.shape)}")
    T = plan.slot_row.shape[0] // plan.k
    if tuple(weights.shape) != (T, plan.k):
        raise ValueError(f"unpermute: weights must have shape [T, k] = [{T}, {plan.k}] for "
                         f"this plan, got {tuple(weights.shape)}")
    _same_device("unpermute", "y", y, slot_row=plan.slot_row, weights=weights)
    return _call("unpermute", y, (y, plan.slot_row, weights), reference.unpermute)


def _plain_k(k) -> bool:
    return type(k) is int and k >= 1


def _check_call(op: str, name: str, x, plan, **tensors) -> None:
    """Raise for what permute/unpermute cannot take: ``x`` or ``tensors`` not tensors, ``plan``
    not a DispatchPlan (a tuple, None), or a plan edited with ``_replace`` to hold a ``k`` that is
    not an int >= 1 or a field that is not a tensor; each failed deep inside the op. Only the
    checked path (not the fast one) runs this."""
    for arg, value in ((name, x), *tensors.items()):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"{op}: plan must be a DispatchPlan (from dispatch_plan), got "
                        f"{type(plan).__name__}")
    if not _plain_k(plan.k):
        raise ValueError(f"{op}: plan.k={plan.k!r} must be an int >= 1 (slots per token)")
    for field in ("row_slot", "expert_offsets", "counts", "slot_row"):
        value = getattr(plan, field)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: plan.{field} must be a torch.Tensor, got "
                            f"{type(value).__name__}")


def _same_device(op: str, first_name: str, first, **others) -> None:
    """ValueError unless every tensor of ``others`` is on ``first``'s device: a mix with the meta
    device would otherwise run the shape-only kernel and return uninitialised memory."""
    if not isinstance(first, torch.Tensor):
        return
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != first.device:
            raise ValueError(f"{op}: {name} must be on {first_name}'s device {first.device}, "
                             f"got {t.device}")


def _call(name, first, args, ref):
    device_type = first.device.type if isinstance(first, torch.Tensor) else "cpu"
    if _loader.native is not None and (torch.compiler.is_compiling()
                                       or _loader.has_kernel(name, device_type)):
        return getattr(torch.ops.moe_route, name)(*args)
    _loader.fallback(name, device_type)
    return ref(*args)


if _loader.native is not None:
    @torch.library.register_fake("moe_route::dispatch_plan")
    def _plan_fake(ids, num_experts, block_size=1):
        reference.check_dispatch_args(ids, num_experts, block_size)
        T, k = ids.shape
        R = reference.dispatch_rows(T, k, num_experts, block_size)
        new = lambda *shape: ids.new_empty(shape, dtype=torch.int64)  # noqa: E731
        return new(R), new(num_experts + 1), new(num_experts), new(T * k)

    @torch.library.register_fake("moe_route::permute")
    def _permute_fake(x, row_slot, slot_row, k, expert_offsets=None):
        _same_device("permute", "x", x, row_slot=row_slot, slot_row=slot_row,
                     expert_offsets=expert_offsets)
        return x.new_empty((row_slot.shape[0], x.shape[1]))

    @torch.library.register_fake("moe_route::unpermute")
    def _unpermute_fake(y, slot_row, weights):
        _same_device("unpermute", "y", y, slot_row=slot_row, weights=weights)
        return y.new_empty((weights.shape[0], y.shape[1]))

    def _permute_setup(ctx, inputs, output):
        x, _, slot_row, k, _ = inputs
        ctx.save_for_backward(slot_row)
        ctx.T, ctx.k = x.shape[0], k

    def _permute_backward(ctx, grad_rows):
        (slot_row,) = ctx.saved_tensors
        ones = grad_rows.new_ones((ctx.T, ctx.k), dtype=torch.float32)
        return torch.ops.moe_route.unpermute(grad_rows, slot_row, ones), None, None, None, None

    def _unpermute_setup(ctx, inputs, output):
        y, slot_row, weights = inputs
        ctx.R, ctx.y_dtype, ctx.w_dtype = y.shape[0], y.dtype, weights.dtype
        # y is kept only for the weights' gradient.
        keep_y = y if weights.requires_grad else None
        ctx.save_for_backward(slot_row, weights, keep_y)

    def _unpermute_backward(ctx, grad_out):
        slot_row, weights, y = ctx.saved_tensors
        T, k = weights.shape
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            row_slot = _rows_to_slots(slot_row, ctx.R)
            rows = torch.ops.moe_route.permute(grad_out.to(ctx.y_dtype), row_slot, slot_row, k,
                                               None)
            # Padding rows (slot -1) pick the appended 0: their gradient stays zero.
            w_row = torch.cat([weights.reshape(-1).float(),
                               weights.new_zeros(1, dtype=torch.float32)])
            grad_y = (rows.float() * w_row[row_slot][:, None]).to(ctx.y_dtype)
        if ctx.needs_input_grad[2]:
            valid = (slot_row >= 0).view(T, k)
            picked = y[slot_row.clamp(min=0)].float().view(T, k, y.shape[1])  # T may be 0
            dots = torch.bmm(picked, grad_out.float()[:, :, None]).squeeze(-1)
            grad_w = torch.where(valid, dots, torch.zeros_like(dots)).to(ctx.w_dtype)
        return grad_y, None, grad_w

    torch.library.register_autograd("moe_route::permute", _permute_backward,
                                    setup_context=_permute_setup)
    torch.library.register_autograd("moe_route::unpermute", _unpermute_backward,
                                    setup_context=_unpermute_setup)


def _rows_to_slots(slot_row: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The plan's ``row_slot [R]`` rebuilt from ``slot_row``: -1 for rows no slot feeds. A dropped
    slot s (row -1) writes entry R + s, past the rows, so every index is distinct (deterministic
    on every device)."""
    slots = torch.arange(slot_row.shape[0], device=slot_row.device)
    target = torch.where(slot_row >= 0, slot_row, num_rows + slots)
    out = torch.full((num_rows + slot_row.shape[0],), -1, dtype=torch.int64,
                     device=slot_row.device)
    return out.index_copy(0, target, slots)[:num_rows]
