"""SamKV: keep anchors and the blocks a personalized query picks, recompute the kept part."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from samkv_integrations.methods.base import BaseMethod, ContextCache, MethodInput
from samkv_integrations.methods.block_scores import (
    adaptive_ratio,
    fill_budget,
    mean_queries,
    personalize,
    segment_key_means,
    selection_layer_indices,
)
from samkv_integrations.methods.recompute import (
    gather_aligned,
    recompute_behind_prefix,
    split_by_document,
)
from samkv_integrations.timing import Stopwatch

logger = logging.getLogger(__name__)

_CHOICES = {"update": ("overwrite", "fusion"), "ranking": ("per_document", "global")}


@dataclass
class SamKVMethod(BaseMethod):
    """Sparse attention across multiple-context KV caches (Cao et al., AAAI 2026).

    Paper: https://arxiv.org/abs/2508.11661.

    Anchors, each document's first ``n_init`` and last ``n_local`` tokens, are always kept
    (a document shorter than anchors plus one block, whole); the middle is cut into blocks.
    The question, prefilled over the prefix and all anchors at global positions, gives
    ``Qq``, its mean query per head at each selection layer; document ``i`` is scored with
    ``Qi = Qq + 1/(D-1) Σ_{j≠i} |cos(Qj, Qq)| Qj`` (``Qj``: document ``j``'s stored mean
    query of its last tokens), averaged per KV group. Block score ``s_b = Σ_h <Qi_h, mean
    key_h>``, anchor score ``s_anc`` alike; ``P_i = (max s_b - s_anc) / (max s_b - min s_b)``
    if ``min < s_anc <= max`` else 0, averaged over layers. ``ranking="per_document"`` keeps
    each layer's top ``floor(n_blocks · P_i)`` blocks, united over layers; ``"global"`` the
    best blocks of all documents under ``budget`` (anchors counted), by ``s_b - s_anc`` over
    each layer's score range, averaged over layers. Scores are pre-RoPE: the queries are
    ``q_proj`` outputs, so keys are un-rotated per token before block means (post-RoPE
    means would mix in each block's rotation).

    The kept tokens, compacted in global order, are recomputed at every layer behind the
    prefix, attending causally (global positions) to the kept tokens before them;
    ``update="fusion"`` stores ``(1 - θ) · reused + θ · fresh`` (θ: ``fusion_theta``) as the
    forward proceeds, for kept tokens that follow a dropped token of their document. The
    others are overwritten: their reused KV saw nothing the fresh KV misses, so a document
    kept whole (as short nodes are) comes out as full recompute computes it. Everything else
    leaves the decode cache.

    The defaults of the open choices were measured, by mean first-token KL from ``full``
    on the first 20 HotpotQA dev questions (``--chunk-tokens 512``, Qwen2.5-Coder-0.5B;
    the full evals are in the README). ``ranking="global"``: only it holds a budget (the
    adaptive ratio kept 40% of the tokens), and at that same 40% it did about as well
    (KL 0.51 vs 0.46 mean, 0.15 vs 0.20 median). ``update="fusion"`` and selection layers
    at 1/3, 1/2, 2/3 and 5/6 of the depth, rather than overwrite and the last four layers:
    at 14% kept, KL 0.49 with both against 0.84 with neither (0.79 and 0.51 with one).
    On 50 whole answers fusion after a drop, as here, scored F1 0.084, KL 0.738: within noise
    of fusion on every token and of overwrite, and the only one of the three that equals
    full when nothing is dropped. The rest of what was tried: ``benchmarks/ACCURACY.md``.

    Attributes:
        n_init: Leading anchor tokens per document.
        n_local: Trailing anchor tokens per document.
        block_size: Tokens per block (a document's last block may be shorter).
        selection_layers: Layers whose queries score blocks (negative: from the end;
            ``None``: the layers at 1/3, 1/2, 2/3 and 5/6 of the depth).
        update: ``"overwrite"`` or ``"fusion"``.
        fusion_theta: Weight of the fresh KV under fusion, in (0, 1].
        ranking: ``"per_document"`` (adaptive ratio) or ``"global"`` (one budget).
        budget: Kept fraction of context tokens under global ranking, in (0, 1].
    """

    name = "samkv"
    stored_extras = ("query_means",)  # Qj: each document's mean query of its last tokens

    n_init: int = 8
    n_local: int = 8
    block_size: int = 16
    selection_layers: tuple[int, ...] | None = None
    update: str = "fusion"
    fusion_theta: float = 0.9
    ranking: str = "global"
    budget: float = 0.15

    def __post_init__(self) -> None:
        for field, low in (("n_init", 0), ("n_local", 0), ("block_size", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{field} must be an int >= {low}, got {value!r}")
        for field, allowed in _CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        for field, value in (("fusion_theta", self.fusion_theta), ("budget", self.budget)):
            if not (isinstance(value, float) or type(value) is int) or not 0 < value <= 1:
                raise ValueError(f"{field} must be in (0, 1], got {value!r}")
        if (raw := self.selection_layers) is not None:
            layers = tuple(raw) if isinstance(raw, tuple | list) else (raw,)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise ValueError(f"selection_layers must be non-empty ints, got {layers!r}")
            self.selection_layers = layers

    @torch.inference_mode()
    def build(self, inputs: MethodInput, watch: Stopwatch) -> ContextCache:
        """Select and recompute a compact cache from ``[n_layers, n_kv_heads, n, head_dim]`` caches.

        Returns a cache of ``[1, n_kv_heads, prefix_len + n_kept, head_dim]`` per layer;
        ``details`` holds ``anchor_indices`` (per document, local indices) and
        ``adaptive_ratio`` (per document ``P_i``).
        """
        model, docs, device = inputs.model, inputs.documents, inputs.model.device
        lengths = [d.n_tokens for d in docs]
        middle = [n - self.n_init - self.n_local for n in lengths]
        n_blocks = [-(-m // self.block_size) if m >= self.block_size else 0 for m in middle]
        anchors = [
            [*range(self.n_init), *range(n - self.n_local, n)] if b else list(range(n))
            for n, b in zip(lengths, n_blocks, strict=True)
        ]
        ratio = torch.zeros(len(lengths), device=device)
        with watch.phase("select"):
            n = torch.tensor(lengths, dtype=torch.long, device=device)
            doc = torch.arange(len(n), device=device).repeat_interleave(n, output_size=sum(lengths))
            local = torch.arange(len(doc), device=device) - (n.cumsum(0) - n)[doc]
            keep = (torch.tensor(n_blocks, device=device)[doc] == 0) | (local < self.n_init)
            keep |= local >= n[doc] - self.n_local
            block = (local - self.n_init).div(self.block_size, rounding_mode="floor").clamp(min=0)
            if any(n_blocks):
                slot = doc * (max(n_blocks) + 1) + (block + 1) * ~keep
                blocks, ratio = self._select(inputs, slot, n_blocks, anchors)
                keep |= blocks[doc, block.clamp(max=max(n_blocks) - 1)]
            kept = keep.nonzero().squeeze(1)
            kept_local = split_by_document(kept, lengths)
        with watch.phase("recompute"):
            ids = torch.tensor([t for d in docs for t in d.token_ids], device=device)
            positions, reused, theta = kept + inputs.prefix.length, None, None
            if self.update == "fusion" and len(kept):
                theta = self._fusion_weights(kept_local)
            if theta is not None:
                reused = gather_aligned(model, docs, inputs.doc_starts, kept_local)
            prefix = inputs.prefix
            cache = recompute_behind_prefix(model, prefix, ids[kept], positions, reused, theta)
        return ContextCache(
            cache=cache,
            positions=torch.cat([torch.arange(inputs.prefix.length, device=device), positions]),
            next_position=inputs.context_end,
            kept_indices=kept_local,
            recomputed_tokens=int(kept.numel()),
            details={"anchor_indices": anchors, "adaptive_ratio": ratio.tolist()},
        )

    def _fusion_weights(self, kept_local: list[torch.Tensor]) -> torch.Tensor | None:
        """``[n_kept]`` weights of the fresh KV: ``fusion_theta`` after a dropped token, else 1.

        A reused entry was computed over its whole document up to it; it knows more than
        the fresh one only if a token of its document before it was dropped. ``None`` when
        no kept token follows a drop: there is nothing to blend, nor reused KV to gather.
        """
        after_drop = torch.cat([k > torch.arange(len(k), device=k.device) for k in kept_local])
        if not after_drop.any():
            return None
        return torch.where(after_drop, self.fusion_theta, 1.0)

    def _select(
        self, inputs: MethodInput, slot: torch.Tensor, n_blocks: list[int], anchors: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept blocks ``[D, max_blocks]`` and ratios ``[D]``, from each token's block slot."""
        model, docs = inputs.model, inputs.documents
        n_layers, n_kv_heads = docs[0].keys.shape[:2]
        layers = selection_layer_indices(n_layers, self.selection_layers)
        local = [torch.tensor(a, dtype=torch.long, device=model.device) for a in anchors]
        anchor_kv = gather_aligned(model, docs, inputs.doc_starts, local)
        q_ids, start = inputs.question_ids, inputs.context_end
        generic = mean_queries(model, inputs.prefix, anchor_kv, q_ids, start, layers)
        own = torch.stack([d.query_means[layers].float() for d in docs])
        queries = personalize(generic, own, n_kv_heads)
        width = max(n_blocks) + 1
        means, counts = segment_key_means(model, docs, layers, slot, len(docs) * width)
        scores = torch.einsum("dshe,shdbe->dsb", queries, means.unflatten(2, (len(docs), width)))
        anchor_score, block_scores = scores[..., 0], scores[..., 1:]
        sizes = torch.tensor(n_blocks, device=scores.device)
        valid = torch.arange(width - 1, device=scores.device) < sizes[:, None]
        ratio = adaptive_ratio(block_scores, anchor_score, valid[:, None]).mean(1)
        if self.ranking == "per_document":
            top = block_scores.masked_fill(~valid[:, None], -math.inf)
            rank = top.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
            return ((rank < (sizes * ratio).floor()[:, None, None]) & valid[:, None]).any(1), ratio
        room = math.floor(self.budget * len(slot)) - sum(len(a) for a in anchors)
        if room <= 0:
            logger.info("samkv: anchors alone fill budget=%s; keeping anchors only", self.budget)
        block_tokens = counts.view(len(docs), width)[:, 1:]
        return fill_budget(block_scores, anchor_score, valid, block_tokens, room), ratio
