"""The Triton kernels behind ``split_kv_attention`` (imported only where Triton is installed).

``partial``: one program per ``(batch × KV head, split)`` attends the group's queries to its
split of the keys with an online softmax, and writes the normalised partial output
``[group, head_dim]`` and its log-sum-exp ``[group]`` (float32). ``merge``: one program per
``(batch × KV head, query)`` weights the splits' outputs by ``exp(lse - max lse)``.
"""

# mypy: ignore-errors
# ruff: noqa: N803
# Triton's kernels are typed by its JIT, not by Python annotations, and its convention
# names pointers and compile-time constants in capitals.

from __future__ import annotations

import triton
import triton.language as tl


# Triton compiles a kernel again for each new "specialization" of its integer arguments (equal
# to 1, divisible by 16): the key count and the mask's row stride change with every cache
# length, and a compile stalls the step that meets it (88 ms for the merge of a first 16-row
# step, 0.5 s for ``partial``, on an H200). Those two only bound loops and masks; the strides
# of the keys and values stay specialized, since their alignment lets the loads vectorize.
@triton.jit(do_not_specialize=["stride_mb", "slots"])
def partial(
    Q, K, V, Mask, Partial, Lse, scale,
    stride_qb, stride_qh, stride_qg,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_ms,
    n_kv_heads, slots, keys_per_split,
    GROUP: tl.constexpr, BLOCK_GROUP: tl.constexpr, BLOCK_KEYS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Partial attention of one KV head's queries over one split of its keys."""
    pair = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    batch = pair // n_kv_heads
    head = pair % n_kv_heads
    rows = tl.arange(0, BLOCK_GROUP)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < GROUP
    query = tl.load(
        Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qg + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    key_base = K + batch * stride_kb + head * stride_kh
    value_base = V + batch * stride_vb + head * stride_vh
    first = split * keys_per_split
    last = tl.minimum(first + keys_per_split, slots)
    running_max = tl.full((BLOCK_GROUP,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_GROUP,), tl.float32)
    acc = tl.zeros((BLOCK_GROUP, HEAD_DIM), tl.float32)
    for start in range(first, last, BLOCK_KEYS):
        cols = start + tl.arange(0, BLOCK_KEYS)
        col_ok = cols < last
        keys = tl.load(
            key_base + cols[:, None] * stride_ks + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        scores = (tl.dot(query, tl.trans(keys)) * scale).to(tl.float32)
        if HAS_MASK:
            bias = tl.load(Mask + batch * stride_mb + cols * stride_ms, mask=col_ok, other=0.0)
            scores += bias.to(tl.float32)[None, :]
        # Every block holds at least one slot below ``last``, so each row's max is finite.
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.exp(scores - new_max[:, None])
        rescale = tl.exp(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        values = tl.load(
            value_base + cols[:, None] * stride_vs + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values)
        running_max = new_max
    slot = pair * splits + split
    out = acc / running_sum[:, None]
    tl.store(
        Partial + (slot * GROUP + rows[:, None]) * HEAD_DIM + dims[None, :],
        out,
        mask=row_ok[:, None],
    )
    tl.store(Lse + slot * GROUP + rows, running_max + tl.log(running_sum), mask=row_ok)


@triton.jit(do_not_specialize=["splits"])
def merge(
    Partial, Lse, Out, splits, group, head_dim,
    BLOCK_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One query's output: the splits' partial outputs weighted by their softmax mass.

    The splits are read ``BLOCK_SPLITS`` at a time, a first pass for their largest
    log-sum-exp and a second for the weighted sum, so that one compiled kernel serves every
    split count (it changes with the batch size).
    """
    pair = tl.program_id(0)
    row = tl.program_id(1)
    parts = tl.arange(0, BLOCK_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    base = pair * splits
    block_max = tl.full((BLOCK_SPLITS,), float("-inf"), tl.float32)
    for start in range(0, splits, BLOCK_SPLITS):
        part_ok = start + parts < splits
        lse = tl.load(Lse + (base + start + parts) * group + row, mask=part_ok, other=float("-inf"))
        block_max = tl.maximum(block_max, lse)
    top = tl.max(block_max, 0)
    weight_sums = tl.zeros((BLOCK_SPLITS,), tl.float32)
    weighted = tl.zeros((BLOCK_SPLITS, HEAD_DIM), tl.float32)
    for start in range(0, splits, BLOCK_SPLITS):
        slot = base + start + parts
        part_ok = start + parts < splits
        lse = tl.load(Lse + slot * group + row, mask=part_ok, other=float("-inf"))
        weights = tl.exp(lse - top)
        outs = tl.load(
            Partial + (slot[:, None] * group + row) * head_dim + dims[None, :],
            mask=part_ok[:, None],
            other=0.0,
        )
        weighted += outs * weights[:, None]
        weight_sums += weights
    merged = tl.sum(weighted, 0) / tl.sum(weight_sums, 0)
    tl.store(Out + (pair * group + row) * head_dim + dims, merged.to(Out.dtype.element_ty))
