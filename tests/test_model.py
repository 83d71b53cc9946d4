"""load_model, LoadedModel and fingerprints, on tiny random-weight models built offline."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from samkv_integrations.decode import eos_token_ids
from samkv_integrations.models import LoadedModel, digests, load_model, samkv_home
from samkv_integrations.models.loaded import fingerprint_model, weights_identity_of_module
from samkv_integrations.models.shapes import random_model

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def make_tokenizer() -> PreTrainedTokenizerFast:
    # Byte-level BPE with no merges: every byte is a token, nothing to download.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_model(arch: str = "llama", seed: int = 0, **overrides: int) -> PreTrainedModel:
    config_cls, model_cls = ARCHS[arch]
    shape = {"intermediate_size": 128, "num_hidden_layers": 2, **overrides}
    config = config_cls(
        vocab_size=300,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **shape,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def save(model: PreTrainedModel, path: Path) -> Path:
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Weight digests are cached under $SAMKV_HOME: never the user's own.
    monkeypatch.setenv("SAMKV_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(params=sorted(ARCHS))
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_from_module_fingerprint_is_deterministic(arch: str) -> None:
    a = LoadedModel.from_module(make_model(arch), make_tokenizer(), f"random:{arch}")
    b = LoadedModel.from_module(make_model(arch), make_tokenizer(), f"random:{arch}")
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 64
    assert a.max_context == 256
    assert a.device == torch.device("cpu")
    assert a.dtype == torch.float32
    assert not a.model.training


def test_fingerprint_changes_with_one_weight(arch: str) -> None:
    model = make_model(arch)
    before = LoadedModel.from_module(model, make_tokenizer(), "random").fingerprint
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert LoadedModel.from_module(model, make_tokenizer(), "random").fingerprint != before


def test_fingerprint_changes_with_dtype_and_architecture() -> None:
    llama = LoadedModel.from_module(make_model("llama"), make_tokenizer(), "random")
    half = LoadedModel.from_module(make_model("llama").to(torch.bfloat16), make_tokenizer(), "r")
    qwen = LoadedModel.from_module(make_model("qwen2"), make_tokenizer(), "random")
    assert half.dtype == torch.bfloat16
    assert len({llama.fingerprint, half.fingerprint, qwen.fingerprint}) == 3
    # The same weights identity still separates dtypes and architectures.
    identity = "same-weights"
    fps = {fingerprint_model(m, identity) for m in (make_model(), make_model().half())}
    assert len(fps) == 2


def test_fingerprint_ignores_loader_bookkeeping() -> None:
    model = make_model()
    identity = weights_identity_of_module(model)
    before = fingerprint_model(model, identity)
    model.config._name_or_path = "/somewhere/else"
    model.config.use_cache = not model.config.use_cache
    assert fingerprint_model(model, identity) == before


def test_load_model_from_directory(tmp_path: Path, arch: str) -> None:
    built = make_model(arch)
    path = save(built, tmp_path / "a")
    first = load_model(path)
    second = load_model(str(path), device="cpu", dtype="float32")
    assert first.fingerprint == second.fingerprint
    assert first.name == str(path)
    assert type(first.model) is type(built) and not first.model.training
    assert first.model.config._attn_implementation == "sdpa"
    ids = torch.tensor([first.tokenizer("hello world")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(first.model(ids).logits, built(ids).logits)

    other = load_model(save(make_model(arch, seed=1), tmp_path / "b"))
    assert other.fingerprint != first.fingerprint
    half = load_model(path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.fingerprint != first.fingerprint


def test_load_model_rejects_bad_dtype(tmp_path: Path) -> None:
    path = save(make_model(), tmp_path / "m")
    with pytest.raises(ValueError, match="float8"):
        load_model(path, dtype="float8")
    with pytest.raises(ValueError, match="device"):
        load_model(path, device="no-such-device")


@pytest.mark.parametrize("name", ["./missing-model", "/nonexistent/dir/model", "x/y/z.gguf"])
def test_load_model_missing_local_path_never_goes_to_hub(name: str) -> None:
    with pytest.raises(ValueError, match=name.removeprefix("./")):
        load_model(name)


def test_load_model_missing_path_object(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not-here"):
        load_model(tmp_path / "not-here")


def test_load_model_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("config.json")):
        load_model(tmp_path)


def test_load_model_unknown_bare_name_lists_registry() -> None:
    with pytest.raises(ValueError, match="no-such-model") as info:
        load_model("no-such-model")
    assert "smollm2-135m-instruct" in str(info.value)


def test_samkv_home_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMKV_HOME", str(tmp_path / "cache" / "samkv"))
    home = samkv_home()
    assert home == tmp_path / "cache" / "samkv" and home.is_dir()


MIB = 1 << 20


def age(path: Path, seconds: int = 60) -> None:
    """Date ``path`` back: a digest taken right after a write is not trusted (racy mtime)."""
    past = path.stat().st_mtime_ns - seconds * 10**9
    os.utime(path, ns=(past, past))


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = digests._hash_file

    def spy(path: Path, size: int) -> str:
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(digests, "_hash_file", spy)
    return calls


def add_to_layer(weights: Path, prefix: str, delta: float) -> tuple[int, int]:
    """Add ``delta`` to every float32 of the tensors named ``prefix*``, rewriting them in place.

    Returns the byte range of the file that changed.
    """
    with open(weights, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        ranges = [
            (8 + length + info["data_offsets"][0], 8 + length + info["data_offsets"][1])
            for name, info in header.items()
            if name.startswith(prefix)
        ]
        assert ranges and all(header[n]["dtype"] == "F32" for n in header if n.startswith(prefix))
        for start, end in ranges:
            fh.seek(start)
            values = np.frombuffer(fh.read(end - start), dtype="<f4") + np.float32(delta)
            fh.seek(start)
            fh.write(values.astype("<f4").tobytes())
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def test_fingerprint_changes_when_a_middle_layer_is_rewritten(tmp_path: Path) -> None:
    # Issue 14: +0.5 on a whole middle layer kept the fingerprint (it sampled the first and
    # last MiB of each file), so the changed model was served the original's caches.
    built = make_model(intermediate_size=2048, num_hidden_layers=4)
    path = save(built, tmp_path / "m")
    weights = path / "model.safetensors"
    age(weights)
    before = load_model(path)
    size = weights.stat().st_size
    start, end = add_to_layer(weights, "model.layers.2.", 0.5)
    assert start >= MIB and end <= size - MIB, "the change must lie outside the sampled MiBs"
    assert weights.stat().st_size == size

    after = load_model(path)
    assert after.fingerprint != before.fingerprint
    torch.testing.assert_close(
        after.model.model.layers[2].mlp.down_proj.weight,
        built.model.layers[2].mlp.down_proj.weight + 0.5,
    )


def test_loading_twice_hashes_once(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(make_model(), tmp_path / "m")
    weights = path / "model.safetensors"
    age(weights)
    calls = count_hashes(monkeypatch)
    first = load_model(path)
    second = load_model(path)
    assert first.fingerprint == second.fingerprint
    assert calls == [weights.resolve()]
    entry = json.loads((home / digests.CACHE_FILE).read_text())["files"][str(weights.resolve())]
    assert entry["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "corrupt",
    [
        b"\xff\xfe{ not json",
        b"[]",
        b'{"format": "samkv-weight-digests-v0", "files": {}}',
        b"",
    ],
    ids=["garbage", "list", "foreign-format", "empty"],
)
def test_corrupt_digest_cache_is_rebuilt(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch, corrupt: bytes
) -> None:
    path = save(make_model(), tmp_path / "m")
    age(path / "model.safetensors")
    expected = load_model(path).fingerprint
    cache = home / digests.CACHE_FILE
    cache.write_bytes(corrupt)
    calls = count_hashes(monkeypatch)
    assert load_model(path).fingerprint == expected
    assert len(calls) == 1
    assert str((path / "model.safetensors").resolve()) in json.loads(cache.read_text())["files"]
    assert load_model(path).fingerprint == expected
    assert len(calls) == 1


def test_malformed_or_stale_digest_entries_are_not_trusted(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(make_model(), tmp_path / "m")
    weights = path / "model.safetensors"
    age(weights)
    expected = load_model(path).fingerprint
    cache = home / digests.CACHE_FILE
    data = json.loads(cache.read_text())
    entry = data["files"][str(weights.resolve())]
    calls = count_hashes(monkeypatch)
    for bad in ({**entry, "sha256": "not-a-digest"}, {**entry, "size": entry["size"] + 1}):
        cache.write_text(json.dumps({**data, "files": {str(weights.resolve()): bad}}))
        assert load_model(path).fingerprint == expected
    assert len(calls) == 2


def test_touching_mtime_rehashes_to_the_same_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(make_model(), tmp_path / "m")
    weights = path / "model.safetensors"
    age(weights, seconds=120)
    first = load_model(path)
    age(weights, seconds=-60)
    calls = count_hashes(monkeypatch)
    second = load_model(path)
    assert calls == [weights.resolve()]
    assert second.fingerprint == first.fingerprint


def test_random_weights_refuse_model_kwargs() -> None:
    with pytest.raises(ValueError, match="model_kwargs"):
        load_model("random:tiny-llama", device="cpu", model_kwargs={"revision": "v1"})


def test_model_kwargs_reach_from_pretrained(tmp_path: Path) -> None:
    loaded = load_model("random:tiny-llama", device="cpu")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    # Loading succeeds without it: the error shows the keyword reached from_pretrained.
    with pytest.raises(ValueError):
        load_model(str(tmp_path), device="cpu", model_kwargs={"subfolder": "missing"})
    again = load_model(str(tmp_path), device="cpu", model_kwargs={"low_cpu_mem_usage": True})
    assert again.fingerprint == load_model(str(tmp_path), device="cpu").fingerprint


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
def test_random_shapes_use_their_tokenizers_special_ids(shape: str) -> None:
    # The shape's family ids (Llama's EOS is 2) are plain bytes in the byte tokenizer:
    # generation would stop at '#'.
    loaded = random_model(shape, device="cpu")
    tokenizer, generation = loaded.tokenizer, loaded.model.generation_config
    assert eos_token_ids(loaded.model, tokenizer) == {tokenizer.eos_token_id}
    assert (generation.bos_token_id, generation.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.pad_token_id,
    )
