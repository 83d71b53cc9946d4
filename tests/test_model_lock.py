"""The engine's model lock: cuDNN attention off while held, and a lone answer's first text
not held behind the prefills queued for the lock."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from samkv_integrations import KVCacheStore, SamKVEngine, model_lock
from samkv_integrations.fair_lock import FairLock
from samkv_integrations.methods import DecodeState
from samkv_integrations.model_lock import ModelLock
from samkv_integrations.models import LoadedModel

DOCS = ["Alpha is the first letter.", "Lyon sits where the Rhone meets the Saone."]


@pytest.fixture
def cudnn_attention() -> Iterator[None]:
    """Leave SDPA's process-wide cuDNN flag as the test found it."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cudnn_attention_is_off_while_held_and_restored_after(cudnn_attention: None) -> None:
    torch.backends.cuda.enable_cudnn_sdp(True)
    lock = ModelLock(FairLock(), skip_cudnn_attention=True)
    with lock:
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        with lock:  # reentrant: the inner exit must not restore it
            pass
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(RuntimeError, match="boom"), lock:
        raise RuntimeError("boom")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert lock.lock.acquire(timeout=1)  # and the lock itself was released
    lock.lock.release()


def test_a_caller_who_turned_cudnn_attention_off_keeps_it_off(cudnn_attention: None) -> None:
    torch.backends.cuda.enable_cudnn_sdp(False)
    with ModelLock(threading.RLock(), skip_cudnn_attention=True):
        pass
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_overlapping_engines_restore_the_flag_when_the_last_leaves(cudnn_attention: None) -> None:
    torch.backends.cuda.enable_cudnn_sdp(True)
    first = ModelLock(FairLock(), skip_cudnn_attention=True)
    second = ModelLock(FairLock(), skip_cudnn_attention=True)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # the second still holds its lock
    second.__exit__(None, None, None)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_the_option_changed_while_held_still_restores_the_flag(cudnn_attention: None) -> None:
    torch.backends.cuda.enable_cudnn_sdp(True)
    lock = ModelLock(FairLock(), skip_cudnn_attention=True)
    with lock:
        lock.skip_cudnn_attention = False  # as benchmarks/prefill_shapes.py does between runs
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with lock:
        assert torch.backends.cuda.cudnn_sdp_enabled()


def test_a_failed_switch_leaves_the_lock_free(
    cudnn_attention: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = ModelLock(FairLock(), skip_cudnn_attention=True)

    def broken() -> None:
        raise RuntimeError("no flag")

    monkeypatch.setattr(model_lock._CUDNN_ATTENTION_OFF, "enter", broken)
    with pytest.raises(RuntimeError, match="no flag"), lock:
        pass
    taken: list[bool] = []
    other = threading.Thread(target=lambda: taken.append(lock.lock.acquire(timeout=5)))
    other.start()
    other.join(timeout=10)
    assert taken == [True]


def test_off_cuda_the_flag_is_left_alone(
    cudnn_attention: None, tiny_llama: LoadedModel, memory_store: KVCacheStore
) -> None:
    torch.backends.cuda.enable_cudnn_sdp(True)
    engine = SamKVEngine(tiny_llama, memory_store)
    assert not engine._lock.skip_cudnn_attention
    with engine._lock:
        assert torch.backends.cuda.cudnn_sdp_enabled()


def test_a_lone_answers_first_text_does_not_wait_for_the_lock(
    tiny_llama: LoadedModel, memory_store: KVCacheStore
) -> None:
    """Another prefill takes the (FIFO) lock as this answer's ends: its first delta still comes."""
    engine = SamKVEngine(tiny_llama, memory_store)
    refs = engine.index(DOCS, progress=False)
    expected = engine.answer("Where?", refs, method="reuse", max_new_tokens=4)
    taken, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with engine._lock:
            taken.set()
            release.wait(timeout=30)

    blocker = threading.Thread(target=hold_the_lock)

    def queue_a_prefill(_state: DecodeState) -> None:  # called at the prefill's end
        blocker.start()

    stream = iter(
        engine.stream("Where?", refs, method="reuse", max_new_tokens=4, observe=queue_a_prefill)
    )
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(next(stream)))
    reader.start()
    assert taken.wait(timeout=30)
    reader.join(timeout=10)
    try:
        assert not reader.is_alive(), "the first delta waited for the model lock"
    finally:
        release.set()
        blocker.join(timeout=30)
        reader.join(timeout=30)
    assert first[0] + "".join(stream) == expected.text
