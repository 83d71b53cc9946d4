"""Small records that pass between the store, the methods, the engine and the adapters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from samkv_integrations.cache_format import FORMAT_VERSION
from samkv_integrations.errors import CacheMissError


@dataclass(slots=True)
class DocumentKV:
    """One document's KV cache, computed alone behind the shared prefix.

    Attributes:
        token_ids: The framed document's token ids (what was prefilled).
        keys: ``[n_layers, n_kv_heads, n_tokens, head_dim]``, post-RoPE at the local
            positions ``prefix_len .. prefix_len + n_tokens - 1``.
        values: ``[n_layers, n_kv_heads, n_tokens, head_dim]``.
        fingerprint: The model fingerprint of the model that computed it.
        prefix_len: Length of the shared prefix it was computed behind.
        extras: The stored extras methods declared (``BaseMethod.stored_extras``), by
            name; ``cache_format.EXTRAS`` gives each one's shape and computation.
    """

    token_ids: list[int]
    keys: torch.Tensor
    values: torch.Tensor
    fingerprint: str
    prefix_len: int
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Number of document tokens."""
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors, extras included."""
        tensors = (self.keys, self.values, *self.extras.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def query_means(self) -> torch.Tensor:
        """The ``query_means`` extra ``[n_layers, n_q_heads, head_dim]`` that SamKV reads.

        The mean pre-RoPE query of the document's last ``cache_format.QUERY_WINDOW`` tokens.

        Raises:
            CacheMissError: The cache holds no ``query_means``.
        """
        try:
            return self.extras["query_means"]
        except KeyError:
            raise CacheMissError(
                f"this document's cache holds no query_means (it holds {sorted(self.extras)}); "
                "a method that reads it declares it in stored_extras"
            ) from None

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DocumentKV:
        """A copy of the record with ``fn`` applied to every tensor, extras included."""
        return DocumentKV(
            token_ids=list(self.token_ids),
            keys=fn(self.keys),
            values=fn(self.values),
            fingerprint=self.fingerprint,
            prefix_len=self.prefix_len,
            extras={name: fn(t) for name, t in self.extras.items()},
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DocumentKV:
        """Return a copy with the tensors moved (and optionally cast)."""
        # Only host-to-device copies may be asynchronous: a device-to-host copy into
        # pinned memory would hand back a tensor the caller may read before it is filled.
        non_blocking = torch.device(device).type != "cpu"
        return self.map_tensors(
            lambda t: t.to(device=device, dtype=dtype, non_blocking=non_blocking)
        )


@dataclass(slots=True, frozen=True)
class CacheRef:
    """A reference to one stored document cache: what rides on an indexed node.

    Attributes:
        key: The store key (sha256 hex of fingerprint, format version and token ids).
        n_tokens: Number of framed document tokens.
        model: Fingerprint of the model that wrote it.
        format: Store format version it was written with.
        text: The document text, so that a missing cache can be recomputed. Optional.
    """

    key: str
    n_tokens: int
    model: str
    format: int = FORMAT_VERSION
    text: str | None = None


@dataclass(slots=True)
class MethodStats:
    """What a method did to build the decode cache.

    Attributes:
        method: The method's registered name.
        context_tokens: Document tokens in the assembled layout.
        kept_tokens: Document tokens in the decode cache, per document.
        recomputed_tokens: Document tokens whose KV was recomputed (over all layers).
        seconds: Seconds per phase (``load``, then the method's, such as ``select`` and
            ``recompute``, then ``question``); on CUDA, each phase's span on the device's timeline
            (``timing.Stopwatch``), so that they add up to the time to first token.
        recomputed_documents: Documents encoded on the spot because their cache was
            missing, stale or (with fallback) from another model.
    """

    method: str
    context_tokens: int
    kept_tokens: list[int]
    recomputed_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    recomputed_documents: int = 0

    @property
    def kept_fraction(self) -> float:
        """Context tokens in the decode cache over context tokens."""
        return sum(self.kept_tokens) / self.context_tokens if self.context_tokens else 1.0

    @property
    def recomputed_fraction(self) -> float:
        """Context tokens recomputed over context tokens."""
        return self.recomputed_tokens / self.context_tokens if self.context_tokens else 0.0

    @property
    def ttft_s(self) -> float:
        """Time to first token: the sum of all phases."""
        return sum(self.seconds.values())

    def as_dict(self) -> dict[str, object]:
        """Flat JSON-ready view (for response metadata and logs)."""
        return {
            "method": self.method,
            "ttft_s": self.ttft_s,
            "kept_fraction": self.kept_fraction,
            "recomputed_fraction": self.recomputed_fraction,
            "context_tokens": self.context_tokens,
            "kept_tokens": list(self.kept_tokens),
            "recomputed_tokens": self.recomputed_tokens,
            "recomputed_documents": self.recomputed_documents,
            "seconds": dict(self.seconds),
        }


#: Flat metadata keys that carry a CacheRef on a LlamaIndex node or a LangChain Document.
#: Flat scalars only, so that they round-trip through Chroma.
METADATA_KEYS = ("samkv_cache_key", "samkv_model", "samkv_format", "samkv_n_tokens")


def ref_metadata(ref: CacheRef) -> dict[str, str | int]:
    """The flat metadata that identifies ``ref`` on an indexed node or document."""
    return {
        "samkv_cache_key": ref.key,
        "samkv_model": ref.model,
        "samkv_format": ref.format,
        "samkv_n_tokens": ref.n_tokens,
    }


def ref_from_metadata(metadata: Mapping[str, object], text: str | None = None) -> CacheRef | None:
    """Rebuild a ref from node metadata; ``None`` when the node carries no cache key."""
    key = metadata.get("samkv_cache_key")
    if not isinstance(key, str) or not key:
        return None
    n_tokens = metadata.get("samkv_n_tokens", 0)
    fmt = metadata.get("samkv_format", FORMAT_VERSION)
    return CacheRef(
        key=key,
        n_tokens=int(n_tokens) if isinstance(n_tokens, int | float | str) else 0,
        model=str(metadata.get("samkv_model", "")),
        format=int(fmt) if isinstance(fmt, int | float | str) else FORMAT_VERSION,
        text=text,
    )
