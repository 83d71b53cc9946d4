"""The metadata keys the adapter writes on a Document: its cache reference and cache dtype."""

from __future__ import annotations

from samkv_integrations.records import METADATA_KEYS

#: The dtype a Document's cache was written in (``"float32"``), as the LlamaIndex adapter
#: records it: an engine running another dtype can then name the ``dtype`` that serves it.
DTYPE_KEY = "samkv_dtype"
#: Every metadata key the adapter writes (kept out of what vector-store searches return).
TAG_KEYS = (*METADATA_KEYS, DTYPE_KEY)
