"""The decode batch's greedy picks: every greedy answer's next token from one step's logits.

The batcher's worker picks for the answers that decode greedily (``Decoder.run_ahead``),
as ``decode.generate_deltas`` would one at a time: the argmax of each answer's row, EOS
masked while the answer's ``min_new_tokens`` holds it back.
"""

from __future__ import annotations

import math
from typing import cast

import torch

from samkv_integrations.decode import GreedyRun
from samkv_integrations.stacked_cache import Member, to_device_async

__all__ = ["greedy_run", "hand_over", "pick_greedy"]


def pick_greedy(greedy: list[Member], logits: torch.Tensor) -> list[int]:
    """The next token of each greedy answer: ``[rows, vocab]`` argmax, EOS masked as asked.

    Nothing here waits for the step but the final copy of the picks, which lets go of
    the GIL meanwhile: the answers' threads read their last tokens while the step runs.
    """
    device = logits.device
    rows = [m.row for m in greedy]
    scores = logits
    if rows != list(range(len(logits))):
        scores = logits.index_select(0, to_device_async(rows, device, torch.long))
    held = [
        i for i, m in enumerate(greedy) if m.steps_done - m.run_start < greedy_run(m).eos_masked
    ]
    if held:
        scores = scores.clone()  # the step's logits stay as they came
    for eos in {greedy_run(greedy[i]).eos for i in held} - {frozenset()}:
        masked = [i for i in held if greedy_run(greedy[i]).eos == eos]
        columns = to_device_async(sorted(eos), device, torch.long)
        scores[to_device_async(masked, device, torch.long)[:, None], columns] = -math.inf
    return cast(list[int], scores.argmax(-1).tolist())


def greedy_run(member: Member) -> GreedyRun:
    """A greedy member's run (the worker asks only of members that have one)."""
    if member.run is None:
        raise RuntimeError("batched decoding: a greedy pick for an answer that picks its own")
    return member.run


def hand_over(member: Member, token: int) -> bool:
    """Give a greedy member its picked token; whether it steps on, fed that token.

    ``False`` if it left meanwhile, or if its run ends here (an EOS, or its last token): it
    is then ``finished`` and no longer open, and its thread reads its last tokens.
    """
    member.picked.append(token)
    if not member.open:
        return False
    if token in greedy_run(member).eos or member.steps_done >= member.run_until:
        member.finished, member.open, member.kv = True, False, None
        return False
    _, position = cast(tuple[int, int], member.request)
    member.request = (token, position + 1)
    return True
