"""SamKV: keep anchors and the blocks a personalized query picks, recompute the kept part."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from samkv_integrations.methods.aligned import gather_aligned
from samkv_integrations.methods.base import BaseMethod, ContextCache, DecodeState, MethodInput
from samkv_integrations.methods.block_scores import block_layout, select_blocks
from samkv_integrations.methods.eviction import (
    OBSERVATION_WINDOW,
    evict_after_question,
    record_window,
)
from samkv_integrations.methods.kept_tokens import kept_tokens
from samkv_integrations.methods.recompute import recompute_behind_prefix
from samkv_integrations.methods.samkv_options import resolve_options
from samkv_integrations.timing import Stopwatch


@dataclass
class SamKVMethod(BaseMethod):
    """Sparse attention across multiple-context KV caches (Cao et al., AAAI 2026).

    Paper: https://arxiv.org/abs/2508.11661. Anchors, each document's first ``n_init`` and
    last ``n_local`` tokens, are always kept (a document shorter than anchors plus one
    block, whole); the middle is cut into blocks. The question, prefilled over the prefix
    and all anchors at global positions, gives ``Qq``, its mean query per head at each
    selection layer; document ``i`` is scored with ``Qi = Qq + 1/(D-1) Σ_{j≠i} |cos(Qj, Qq)|
    Qj`` (``Qj``: document ``j``'s stored mean query of its last tokens), averaged per KV
    group. Block score ``s_b = Σ_h <Qi_h, mean key_h>``, anchor score ``s_anc`` alike; ``P_i
    = (max s_b - s_anc) / (max s_b - min s_b)`` if ``min < s_anc <= max`` else 0, averaged
    over layers. ``ranking="per_document"`` keeps each layer's top ``floor(n_blocks · P_i)``
    blocks, united over layers; ``"global"`` the best blocks of all documents under
    ``budget`` (anchors counted), by ``s_b - s_anc`` over each layer's score range, averaged
    over layers. Scores are pre-RoPE (queries are ``q_proj`` outputs): keys are un-rotated
    per token before block means, which would otherwise mix in each block's rotation.

    ``scoring="attention"`` (the default) ranks blocks instead by the attention mass the
    question's tokens put on them (``question_attention`` gives the shapes and the cost):
    their queries against the reused keys, RoPE applied, softmax per query head over the
    whole context, averaged over each KV group and the tokens, summed per block, pooled over
    layers and KV heads (``head_pool``). Three options default by scoring (``"auto"``): under
    attention, ``block_size=32``, ``score_positions="adjacent"`` (each document scored as if
    it ended right before the question) and ``question_context="all"``; under
    ``scoring="paper"`` (``"auto"`` resolves to it under per-document ranking), 16,
    ``"global"`` and the paper's ``"anchors"``. Contains-gold difference from ``full`` at 15%
    kept (H200, n=300 per dev set, ``--chunk-tokens 512``; README, "Accuracy on the GPU"),
    these defaults vs the earlier 16/global/anchors: Qwen2.5-Coder-0.5B NQ −8.0 vs −18.7
    points, HotpotQA long −5.3 vs −9.0, short −6.7 vs −11.7; 1.5B NQ −15.7 vs −27.0, long
    −0.7 vs −9.3, short −8.3 vs −15.7.

    The kept tokens, compacted in global order, are recomputed at every layer behind the
    prefix, attending causally (global positions) to the kept tokens before them;
    ``update="fusion"`` stores ``(1 - θ) · reused + θ · fresh`` (θ: ``fusion_theta``) as the
    forward proceeds, for kept tokens that follow a dropped token of their document. The
    others are overwritten: their reused KV saw nothing the fresh KV misses, so a document
    kept whole (as short nodes are) comes out as full recompute computes it. The rest leaves.

    ``resident`` (global ranking) adds a head-level stage after the question (SAGE-KV's
    eviction, arXiv 2503.08879; ``eviction.evict_after_question``): the attention of the
    last (up to 16) question tokens over the recomputed cache, whose kept tokens now attend
    across documents, picks for each KV head of each layer its own ``max(floor(resident ·
    n_context), min_kept)`` tokens among those ``budget`` kept (all of them if fewer were),
    and decoding runs on those. ``budget`` then sets what is recomputed and ``resident`` what
    the decode cache holds (``kept_fraction``). The queries are recorded in the recompute's
    forward; where a decoding policy prefills the question itself (``decode=retro|quest``
    with ``retro_question=pool``), a second forward recomputes them, without the pool. With
    ``budget=0.2, resident=0.15`` (H200, n=300; README, "A head-level stage after the
    question"): Qwen2.5-Coder-1.5B NQ −10.3 points of contains against the default's −16.3,
    HotpotQA long −2.7 against −0.7, 0.5B NQ −10.7 against −10.3; TTFT on the 8B shape at
    8×2048 0.264× full against 0.202×. Off by default: one gain in three. ``resident_kernel``
    (SnapKV's clustering, ``sagekv``'s default) moved 1.5B NQ by −0.7 [−2.3, +1.3]: off.

    ``ranking="global"`` (only it holds a budget), ``update="fusion"`` and the selection layers
    were chosen by first-token KL on the CPU (``benchmarks/ACCURACY.md``).

    Attributes:
        n_init: Leading anchor tokens per document.
        n_local: Trailing anchor tokens per document.
        block_size: Tokens per block (the last may be shorter); ``None``: by scoring.
        selection_layers: Layers whose queries score blocks (negative: from the end;
            ``None``: the layers at 1/3, 1/2, 2/3 and 5/6 of the depth).
        update: ``"overwrite"`` or ``"fusion"``.
        fusion_theta: Weight of the fresh KV under fusion, in (0, 1].
        ranking: ``"per_document"`` (adaptive ratio) or ``"global"`` (one budget).
        budget: Kept fraction of context tokens under global ranking, in (0, 1].
        scoring: ``"paper"``, ``"attention"`` (global ranking only) or ``"auto"``.
        personal_weight: Attention scoring: weight of ``Qi``'s attention, in [0, 1].
        head_pool: Attention scoring: ``"mean"`` or ``"max"`` over layers and KV heads.
        tau: Attention scoring: share of the blocks' mass to keep, in (0, 1]; ``None``: off.
        score_positions: ``"global"`` or ``"adjacent"`` key positions, or ``"auto"``.
        question_context: What the question reads first: ``"anchors"``, ``"all"``, ``"auto"``.
        lexical_weight: Attention scoring: weight of the question's rare ids (``lexical``).
        min_kept: Global ranking: a floor, in tokens, under ``budget``'s share (short contexts).
        resident: Global ranking: share of the context tokens each KV head keeps after the
            question, at most ``budget``; ``None``: the decode cache holds what was kept.
        resident_kernel: With ``resident``: odd width of the neighbourhood in the compacted
            cache (across the gaps between kept blocks) each token's score is averaged over
            before the stage's top-k (SnapKV's clustering; 1: none).
    """

    name = "samkv"
    stored_extras = ("query_means",)  # Qj: each document's mean query of its last tokens
    waits_per_layer = True  # the question's pass reads the layers in order as they load

    n_init: int = 8
    n_local: int = 8
    block_size: int | None = None
    selection_layers: tuple[int, ...] | None = None
    update: str = "fusion"
    fusion_theta: float = 0.9
    ranking: str = "global"
    budget: float = 0.15
    scoring: str = "auto"
    personal_weight: float = 0.0
    head_pool: str = "mean"
    tau: float | None = None
    score_positions: str = "auto"
    question_context: str = "auto"
    lexical_weight: float = 0.0
    min_kept: int = 0
    resident: float | None = None
    resident_kernel: int = 1

    def __post_init__(self) -> None:
        resolve_options(self)

    @torch.inference_mode()
    def build(self, inputs: MethodInput, watch: Stopwatch) -> ContextCache:
        """Select and recompute a compact cache from ``[n_layers, n_kv_heads, n, head_dim]`` caches.

        Returns ``[1, n_kv_heads, prefix_len + n_kept, head_dim]`` per layer; ``details``:
        ``anchor_indices``, and ``adaptive_ratio`` (paper) or ``block_mass_kept`` (attention).
        """
        model, docs, device = inputs.model, inputs.documents, inputs.model.device
        lengths = [d.n_tokens for d in docs]
        facts: dict[str, object] = (
            {"adaptive_ratio": [0.0] * len(lengths)} if self.scoring == "paper" else {}
        )
        with watch.phase("select"):
            size = cast(int, self.block_size)  # resolved from None in __post_init__
            layout = block_layout(lengths, self.n_init, self.n_local, size, device)
            anchors, n_blocks, doc, block, keep = layout
            if any(n_blocks):
                slot = doc * (max(n_blocks) + 1) + (block + 1) * ~keep
                blocks, facts = select_blocks(
                    inputs, slot, n_blocks, anchors, self.budget, self.selection_layers,
                    scoring=self.scoring, ranking=self.ranking, tau=self.tau,
                    personal_weight=self.personal_weight, head_pool=self.head_pool,
                    score_positions=self.score_positions, question_context=self.question_context,
                    lexical_weight=self.lexical_weight, min_kept=self.min_kept,
                )  # fmt: skip
                keep |= blocks[doc, block.clamp(max=max(n_blocks) - 1)]
            kept = kept_tokens(keep, doc, lengths, facts)
        inputs.arrival.wait()  # recompute reads every layer
        with watch.phase("recompute"):
            ids = torch.tensor([t for d in docs for t in d.token_ids], device=device)
            positions, starts = kept.indices + inputs.prefix.length, inputs.doc_starts
            theta = None  # fusion: only a token kept after a drop knows less than its reused KV
            if self.update == "fusion" and kept.after_drop is not None:
                theta = torch.where(kept.after_drop, self.fusion_theta, 1.0)
            reused = None if theta is None else gather_aligned(model, docs, starts, kept.local)
            question = inputs.question_ids if inputs.prefill_question else []
            window = OBSERVATION_WINDOW if self.resident is not None else 0
            with record_window(model, window, question) as recorded:  # what ``resident`` scores
                cache, question_logits = recompute_behind_prefix(  # the question rides along
                    model, inputs.prefix, ids[kept.indices], positions, reused, theta, question,
                    inputs.context_end,
                )  # fmt: skip
        return ContextCache(
            cache=cache,
            positions=torch.cat([torch.arange(inputs.prefix.length, device=device), positions]),
            next_position=inputs.context_end,
            kept_indices=kept.local,
            recomputed_tokens=int(kept.indices.numel()),
            details={"anchor_indices": anchors, **kept.facts},
            question_logits=question_logits,
            question_queries=recorded.queries,
        )

    def after_question(self, state: DecodeState, watch: Stopwatch) -> DecodeState:
        """With ``resident``: keep each KV head's own share of ``[1, n_kv_heads, L, head_dim]``.

        ``details`` then gains ``kept_per_head``, ``union_fraction`` and ``head_agreement``.
        """
        if self.resident is None:
            return state
        return evict_after_question(
            state, watch, self.resident, window=OBSERVATION_WINDOW, n_sink=0, per_head=True,
            min_kept=self.min_kept, kernel=self.resident_kernel,
        )  # fmt: skip
