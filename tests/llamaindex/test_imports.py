from __future__ import annotations

import importlib
import re
from pathlib import Path

import llama_index.llms.samkv

EXPECTED_ALL = [
    "MiniLMEmbedding",
    "SamKVCacheBuilder",
    "SamKVCachesSkippedWarning",
    "SamKVLLM",
    "SamKVQueryEngine",
    "SamKVSynthesizer",
    "SamKVVectorStore",
]

SOURCE = Path(llama_index.llms.samkv.__file__).resolve().parent


def test_all_is_pinned() -> None:
    assert sorted(llama_index.llms.samkv.__all__) == EXPECTED_ALL
    for name in EXPECTED_ALL:
        assert getattr(llama_index.llms.samkv, name).__name__ == name


def test_namespace_folders_have_no_init() -> None:
    # PEP 420: an __init__.py in llama_index/ or llama_index/llms/ would shadow the real
    # llama_index package for everyone who installs this one.
    assert SOURCE.parts[-3:] == ("llama_index", "llms", "samkv")
    assert not (SOURCE.parent / "__init__.py").exists()
    assert not (SOURCE.parent.parent / "__init__.py").exists()
    assert (SOURCE / "py.typed").is_file()


def test_real_llama_index_core_is_not_shadowed() -> None:
    core = importlib.import_module("llama_index.core")
    assert Path(core.__file__).resolve().parent.parent != SOURCE.parent.parent
    assert hasattr(core, "VectorStoreIndex")
    chroma = importlib.import_module("llama_index.vector_stores.chroma")
    assert hasattr(chroma, "ChromaVectorStore")


# What only the engine's internals may touch (STYLE.md habit 15): the store and decode
# modules, the prompt framer and any private engine attribute.
INTERNALS = re.compile(r"samkv_integrations\.(store|decode)\b|\.framer\b|engine\._|\._lock\b")


def test_the_adapter_calls_the_engine_facade_only() -> None:
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(SOURCE.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNALS.search(line)
    ]
    assert offenders == []
