"""From cache refs to the documents' KV on the model's device: load, verify, re-encode.

A ref whose cache is missing, corrupted or (when the caller allows it) another model's is
encoded again from its text and stored; a ref that cannot be is a named error.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from samkv_integrations.cache_format import declared_extras
from samkv_integrations.device_tier import DeviceTier
from samkv_integrations.encode import PrefixKV, encode_documents
from samkv_integrations.errors import (
    CacheCorruptedError,
    CacheMismatchError,
    CacheMissError,
)
from samkv_integrations.layer_arrival import LayerArrival, to_device_by_layer
from samkv_integrations.methods import METHODS
from samkv_integrations.models import LoadedModel
from samkv_integrations.records import CacheRef, DocumentKV
from samkv_integrations.store import KVCacheStore, cache_key

logger = logging.getLogger(__name__)

#: What to do with a cache another model wrote: fail, or re-encode the ref's text.
OnForeignCache = Literal["error", "recompute"]


class KnownIds(Mapping[str, list[int]]):
    """Framed token ids of the last ``capacity`` documents indexed from ids, by store key.

    Their refs carry no text, and a method that reads no stored KV (``full``) needs only
    their ids: this spares it loading their caches. Thread-safe; the oldest are forgotten.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, ids_by_key: Mapping[str, list[int]]) -> None:
        """Remember (or refresh) documents' ids under their keys."""
        with self._lock:
            for key, ids in ids_by_key.items():
                self._ids[key] = ids
                self._ids.move_to_end(key)
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def __getitem__(self, key: str) -> list[int]:
        with self._lock:
            return self._ids[key]

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._ids))

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(slots=True)
class RefLoader:
    """Loads refs' caches for one engine.

    Attributes:
        model: The engine's model.
        store: Where the caches live.
        fingerprint: The engine's fingerprint (model and prompt prefix).
        prefix: The shared prefix cache, behind which documents are re-encoded.
        document_ids: The engine's ``document_ids(text, index=...)``: framed token ids.
        known_ids: Framed token ids of text-less refs, by key, as the engine indexed them:
            a method that does not read stored KV needs only these.
        device_tier: Documents kept on the device by earlier requests (``None``: none);
            a ref found there is not loaded again, and those read from the store here,
            for a method that reads stored KV, are kept.
    """

    model: LoadedModel
    store: KVCacheStore
    fingerprint: str
    prefix: PrefixKV
    document_ids: Callable[..., list[int]]
    known_ids: Mapping[str, list[int]]
    device_tier: DeviceTier | None = None

    def load(
        self, refs: list[CacheRef], reads_cache: bool, on_foreign_cache: OnForeignCache
    ) -> tuple[list[DocumentKV], LayerArrival, int]:
        """Load each ref's cache to the model's device; encode the ones that cannot be used.

        Args:
            refs: The documents, in prompt order.
            reads_cache: Whether the method reads stored KV; if not, refs with text (or
                known ids) get empty KV (``[0]`` tensors) and only their token ids.
            on_foreign_cache: What to do with a cache another model wrote.

        Returns:
            The documents' KV, still arriving on CUDA (``to_device_by_layer``: read a layer
            after ``arrival.wait``), the arrival, and how many were encoded on the spot.
        """
        docs: list[DocumentKV | None] = [None] * len(refs)
        to_encode: list[int] = []
        held = self._held_on_device(refs) if reads_cache else {}
        wanted = [
            i
            for i, ref in enumerate(refs)
            if i not in held
            and (reads_cache or (ref.text is None and ref.key not in self.known_ids))
        ]
        # File reads, checksums and parsing release the GIL: documents load in parallel.
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(wanted)))) as pool:
            fetched = dict(
                zip(wanted, pool.map(self._fetch, [refs[i] for i in wanted]), strict=True)
            )
        for i, ref in enumerate(refs):
            if i in held:
                docs[i] = held[i]
                continue
            if i not in fetched:
                empty = torch.empty(0, device=self.model.device)
                doc_ids = (
                    self.known_ids[ref.key]
                    if ref.text is None
                    else self.document_ids(ref.text, index=i)
                )
                docs[i] = DocumentKV(doc_ids, empty, empty, self.fingerprint, self.prefix.length)
                continue
            try:
                result = fetched[i]
                if isinstance(result, Exception):
                    raise result
                docs[i] = result
            except (CacheMissError, CacheCorruptedError, CacheMismatchError) as e:
                foreign = isinstance(e, CacheMismatchError)
                if ref.text is None or (foreign and on_foreign_cache == "error"):
                    hint = (
                        " (pass on_foreign_cache='recompute' to re-encode it from its text)"
                        if foreign and ref.text is not None
                        else " (the ref carries no text to re-encode it from)"
                    )
                    raise type(e)(f"{e}{hint}") from e
                own_key = cache_key(self.fingerprint, self.document_ids(ref.text, index=i))
                if foreign and self.store.contains(own_key):
                    # Re-encoded on an earlier call: this engine's own cache of the text.
                    docs[i] = self.store.get(own_key, fingerprint=self.fingerprint, shared=True)
                    continue
                logger.warning("re-encoding document %d from its text: %s", i, e)
                if isinstance(e, CacheCorruptedError):
                    self.store.delete(ref.key)
                to_encode.append(i)
        if to_encode:
            ids = [self.document_ids(refs[i].text or "", index=i) for i in to_encode]
            extras = declared_extras(m.stored_extras for m in METHODS.values())
            fresh = encode_documents(
                self.model.model, self.prefix, ids, self.fingerprint, progress=False, extras=extras
            )
            for i, doc in zip(to_encode, fresh, strict=True):
                try:
                    self.store.put(doc.to("cpu"))
                except OSError as e:  # the answer needs no stored copy: warn, answer anyway
                    logger.warning("cannot store the re-encoded document %d: %s", i, e)
                docs[i] = doc
        placed, arrival = to_device_by_layer(
            [doc for doc in docs if doc is not None], self.model.device, self.model.dtype
        )
        if self.device_tier is not None and reads_cache:
            for i, result in fetched.items():  # read from the store under the ref's own key
                if not isinstance(result, Exception):
                    self.device_tier.put(refs[i].key, placed[i], arrival.done)
        return placed, arrival, len(to_encode)

    def _held_on_device(self, refs: list[CacheRef]) -> dict[int, DocumentKV]:
        """The refs the device tier holds, by position; one deleted from the store is dropped."""
        held: dict[int, DocumentKV] = {}
        if self.device_tier is None:
            return held
        for i, ref in enumerate(refs):
            if ref.model != self.fingerprint:  # the store's path names a foreign cache
                continue
            if ref.key in self.device_tier and not self.store.mark_used(ref.key):
                self.device_tier.discard(ref.key)  # deleted from the store: a miss below
            if (doc := self.device_tier.get(ref.key)) is not None:
                held[i] = doc
        return held

    def _fetch(
        self, ref: CacheRef
    ) -> DocumentKV | CacheMissError | CacheCorruptedError | CacheMismatchError:
        """One ref's cache on the model's device, or the error that makes it unusable."""
        try:
            if ref.model != self.fingerprint:
                raise CacheMismatchError(
                    f"cache {ref.key} was written by model {ref.model[:12]}, this engine runs "
                    f"model {self.fingerprint[:12]} ({self.model.name} behind its prompt prefix)"
                )
            return self.store.get(
                ref.key,
                fingerprint=self.fingerprint,
                prefix_len=self.prefix.length,
                extras=declared_extras(m.stored_extras for m in METHODS.values()),
                shared=True,  # to_device_by_layer copies them to the device at once
            )
        except (CacheMissError, CacheCorruptedError, CacheMismatchError) as e:
            return e
