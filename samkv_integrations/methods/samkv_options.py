"""SamKV's options: defaults that follow the scoring, and the checks that name a bad field."""

from __future__ import annotations

from typing import TYPE_CHECKING

from samkv_integrations.methods.option_checks import (
    check_choices,
    check_fractions,
    check_ints,
    check_odd,
)

if TYPE_CHECKING:
    from samkv_integrations.methods.samkv import SamKVMethod

_CHOICES = {
    "update": ("overwrite", "fusion"), "ranking": ("per_document", "global"),
    "scoring": ("paper", "attention"), "head_pool": ("mean", "max"),
    "score_positions": ("global", "adjacent"), "question_context": ("anchors", "all"),
}  # fmt: skip
#: Options whose default (``None``, ``"auto"``) depends on the scoring: measured for attention.
_SCORING_DEFAULTS = {
    "attention": {"block_size": 32, "score_positions": "adjacent", "question_context": "all"},
    "paper": {"block_size": 16, "score_positions": "global", "question_context": "anchors"},
}
#: Fractions in (0, 1], or [0, 1] where True; ``tau`` may also be ``None``.
_FRACTIONS = {
    "fusion_theta": False, "budget": False, "tau": False, "personal_weight": True,
    "lexical_weight": True, "resident": False,
}  # fmt: skip
#: The attention scoring's options, and their values that leave the paper's scoring as is.
_ATTENTION_ONLY = {
    "tau": (None, 1), "personal_weight": (0,), "head_pool": ("mean",), "score_positions": ("global",),
    "lexical_weight": (0,),
}  # fmt: skip


def resolve_options(method: SamKVMethod) -> None:
    """Fill ``method``'s scoring-dependent defaults in place and check every option.

    Raises:
        ValueError: An option out of range, or one that the scoring or ranking cannot use;
            the message names it.
    """
    if method.scoring == "auto":  # the paper's per-document ratio has no attention variant
        method.scoring = "attention" if method.ranking == "global" else "paper"
    for field, value in _SCORING_DEFAULTS.get(method.scoring, _SCORING_DEFAULTS["paper"]).items():
        if getattr(method, field) in (None, "auto"):  # an unknown scoring fails check_choices
            setattr(method, field, value)
    check_ints(method, {"n_init": 0, "n_local": 0, "block_size": 1, "min_kept": 0})
    check_odd(method, ("resident_kernel",))
    check_choices(method, _CHOICES)
    check_fractions(method, _FRACTIONS, optional=("tau", "resident"))
    if method.resident is not None and method.resident > method.budget:
        raise ValueError(f"resident ({method.resident}) must be at most budget ({method.budget})")
    if method.resident is None and method.resident_kernel != 1:
        raise ValueError("resident_kernel applies with resident only")
    moved = [f for f, off in _ATTENTION_ONLY.items() if getattr(method, f) not in off]
    if method.scoring == "paper" and moved:
        raise ValueError(f"{moved[0]} applies to scoring='attention' only")
    # Only global ranking holds a budget: the others have no share for these to refine.
    needs_global = [
        name
        for name, used in (
            ("scoring='attention'", method.scoring == "attention"),
            ("min_kept", bool(method.min_kept)),
            ("resident", method.resident is not None),
        )
        if used
    ]
    if method.ranking != "global" and needs_global:
        raise ValueError(f"ranking must be 'global' with {needs_global[0]}, not {method.ranking!r}")
    if (raw := method.selection_layers) is not None:
        layers = tuple(raw) if isinstance(raw, tuple | list) else (raw,)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise ValueError(f"selection_layers must be non-empty ints, got {layers!r}")
        method.selection_layers = layers
