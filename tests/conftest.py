"""Shared fixtures: tiny random-weight models and isolated stores.

The real default model is used only by tests marked ``real_model``; they share the
user's ``$SAMKV_HOME`` so that it is fetched and converted once per machine.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from samkv_integrations import KVCacheStore, SamKVEngine, static_decode
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.shapes import random_model


def talkative_model(shape: str = "tiny-llama", seed: int = 0, device: str = "cpu") -> LoadedModel:
    """A random-weight model whose greedy answers never end before ``max_new_tokens``.

    Zeroing the output rows of the special tokens means greedy decoding never picks EOS, so
    every answer has text to stream and compare.
    """
    loaded = random_model(shape, device=device, seed=seed)
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight[loaded.tokenizer.all_special_ids] = 0.0
    return LoadedModel.from_module(loaded.model, loaded.tokenizer, loaded.name)


@pytest.fixture(scope="session")
def talkative_llama() -> LoadedModel:
    return talkative_model("tiny-llama")


@pytest.fixture(scope="session")
def talkative_cuda_llama() -> LoadedModel:
    """``talkative_llama`` on the GPU (for CUDA-only tests)."""
    return talkative_model("tiny-llama", device="cuda")


@pytest.fixture(scope="session")
def talkative_qwen2() -> LoadedModel:
    return talkative_model("tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return random_model("tiny-llama", device="cpu", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2() -> LoadedModel:
    return random_model("tiny-qwen2", device="cpu", seed=0)


@pytest.fixture(params=["tiny-llama", "tiny-qwen2"])
def tiny_model(
    request: pytest.FixtureRequest, tiny_llama: LoadedModel, tiny_qwen2: LoadedModel
) -> LoadedModel:
    return {"tiny-llama": tiny_llama, "tiny-qwen2": tiny_qwen2}[request.param]


@pytest.fixture
def memory_store() -> KVCacheStore:
    return KVCacheStore(f"memory://samkv-test-{uuid.uuid4().hex}")


@pytest.fixture
def tiny_engine(tiny_model: LoadedModel, memory_store: KVCacheStore) -> SamKVEngine:
    return SamKVEngine(tiny_model, memory_store)


@pytest.fixture(scope="session")
def default_engine(tmp_path_factory: pytest.TempPathFactory) -> SamKVEngine:
    """The real embedded default model, with a store of its own for this test session."""
    return SamKVEngine.from_pretrained(store=tmp_path_factory.mktemp("kvcache"), device="cpu")


@pytest.fixture
def compiled_graphs(monkeypatch: pytest.MonkeyPatch) -> list[torch.fx.GraphModule]:
    """The graphs dynamo hands a compiled decode step's backend, which runs them as traced.

    One graph per compiled shape means the step traced whole: a graph break would add one.
    """
    graphs: list[torch.fx.GraphModule] = []

    def recording(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(static_decode, "COMPILE_BACKEND", recording)
    monkeypatch.setattr(static_decode, "_COMPILED", [])
    return graphs
