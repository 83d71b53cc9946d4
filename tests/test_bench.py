"""``samkv bench`` on CPU with a tiny random-weight model: structure and ratios, never speed."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from samkv_integrations.bench.cli import main as bench_main
from samkv_integrations.bench.report import ratios
from samkv_integrations.bench.throughput import (
    batch1_paths,
    decode_path_list,
    decode_rate,
)
from samkv_integrations.bench.workloads import Workload, random_documents, vocabulary_ids
from samkv_integrations.encode import cache_nbytes
from samkv_integrations.methods import METHODS
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.compat import with_cache

# Methods that may drop tokens from the decode cache, as specs whose options make them drop
# some on 32-token documents (anchors of 4 + 4 leave three blocks of 8 to choose from).
DROPPING = {"samkv": "samkv+n_init=4+n_local=4+block_size=8+ranking=global+budget=0.4"}
#: Methods whose build runs the question in its own forward (no "question" phase).
QUESTION_IN_BUILD = {"full", "samkv", "sagekv"}
#: Every registered method, those that drop tokens by their spec: the report's keys.
SPECS = [DROPPING.get(name, name) for name in METHODS]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    code = bench_main(
        ["--shape", "tiny-llama", "--device", "cpu", "--workloads", "2x32",
         "--methods", ",".join(SPECS), "--repeats", "1", "--warmup", "0",
         "--decode-steps", "2", "--max-batch", "2", "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def test_report_structure(report: dict[str, Any]) -> None:
    assert report["model"]["name"] == "random:tiny-llama"
    assert report["environment"]["device_type"] == "cpu"
    assert {"torch", "transformers", "python"} <= set(report["environment"])
    assert report["command"] and report["settings"]["workloads"] == "2x32"
    (work,) = report["workloads"]
    assert (work["workload"], work["documents"], work["context_tokens"]) == ("2x32", 2, 64)
    assert list(work["methods"]) == SPECS  # keyed by spec, in the order given
    for name, result in work["methods"].items():
        assert "error" not in result, f"{name}: {result.get('error')}"
        assert len(result["runs"]) == 1
        assert result["ttft_s"] == pytest.approx(sum(result["phases"].values()))
        assert "load" in result["phases"]
        # full, samkv and sagekv run the question in their own last forward (recompute).
        in_build = name.split("+")[0] in QUESTION_IN_BUILD
        assert ("question" in result["phases"]) != in_build
        assert result["decode_tokens_per_s_batch1"] > 0
        assert 1 <= result["decode_max_batch"] <= 2
        assert result["peak_memory_bytes"] is None  # measured on CUDA only
        # Off CUDA, auto times the plain decoder and the static cache run eagerly.
        assert list(result["decode_paths_batch1"]) == ["eager", "static"]
        for path in result["decode_paths_batch1"].values():
            assert path["tokens_per_s"] > 0 and path["first_step_s"] > 0
            assert path["of_memory_bound"] is None  # no bandwidth measured off CUDA
        assert result["decode_memory_bound_tokens_per_s"] is None
    assert report["settings"]["decode_path_list"] == ["eager", "static"]
    assert report["environment"]["copy_bytes_per_s"] is None


def test_ratios_are_against_full_of_the_same_run(report: dict[str, Any]) -> None:
    (work,) = report["workloads"]
    full = work["methods"]["full"]
    assert all(value == 1.0 for value in work["ratios"]["full"].values() if value is not None)
    for name, result in work["methods"].items():
        ratio = work["ratios"][name]
        assert ratio["ttft"] == pytest.approx(result["ttft_s"] / full["ttft_s"])
        assert ratio["kv_bytes"] == pytest.approx(result["kv_bytes"] / full["kv_bytes"])


def test_kv_bytes_follow_the_kept_tokens(report: dict[str, Any]) -> None:
    (work,) = report["workloads"]
    methods = work["methods"]
    assert methods["reuse"]["kv_bytes"] == methods["full"]["kv_bytes"]
    assert methods["reuse"]["kept_fraction"] == 1.0
    for spec in DROPPING.values():
        if spec in methods:
            assert methods[spec]["kept_fraction"] < 1.0
            assert methods[spec]["kv_bytes"] < methods["full"]["kv_bytes"]


def test_ratios_without_full_are_empty() -> None:
    assert ratios({"reuse": {"ttft_s": 1.0}}) == {}
    measured = ratios(
        {"full": {"ttft_s": 2.0, "kv_bytes": 10}, "x": {"ttft_s": 1.0, "kv_bytes": 5}}
    )
    assert measured["x"]["ttft"] == 0.5 and measured["x"]["kv_bytes"] == 0.5
    assert measured["x"]["peak_memory"] is None


def test_documents_are_ordinary_vocabulary_ids(tiny_llama: LoadedModel) -> None:
    vocabulary = vocabulary_ids(tiny_llama)
    docs = random_documents(vocabulary, Workload.parse("3x50"), seed=1)
    special = set(tiny_llama.tokenizer.all_special_ids)
    assert [len(d) for d in docs] == [50, 50, 50]
    assert all(
        0 <= t < tiny_llama.model.config.vocab_size and t not in special for d in docs for t in d
    )
    assert docs == random_documents(vocabulary, Workload.parse("3x50"), seed=1)
    assert docs != random_documents(vocabulary, Workload.parse("3x50"), seed=2)


@pytest.mark.parametrize("text", ["8", "8x", "x2", "0x5", "3x-1", "axb"])
def test_bad_workloads_name_the_field(text: str) -> None:
    with pytest.raises(ValueError, match="workloads"):
        Workload.parse(text)


def test_spec_options_reach_the_method(report: dict[str, Any]) -> None:
    (work,) = report["workloads"]
    # budget=0.4 under global ranking: the kept fraction holds to it (the default keeps more).
    assert work["methods"][DROPPING["samkv"]]["kept_fraction"] <= 0.4 + 1e-9


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("full,samkv+budgt=0.15", "unknown option 'budgt' of 'samkv'"),
        ("full,samkv+budget=2", "budget"),
        ("full,nope", "unknown method 'nope'"),
        ("full,full", "repeated full"),
    ],
)
def test_bad_specs_fail_at_parse_time(
    methods: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A model that cannot load: the spec error must come first, from argument parsing.
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--model", "/no/such/model", "--methods", methods])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --methods: " in err and message in err
    assert "Traceback" not in err


def test_old_option_flag_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_main(["--option", "samkv.budget=0.15"])
    assert "unrecognized arguments: --option" in capsys.readouterr().err


def test_batched_decode_leaves_the_request_cache_alone(tiny_llama: LoadedModel) -> None:
    from transformers import DynamicCache

    model = tiny_llama.model
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.arange(1, 11)[None], **with_cache(model, cache), use_cache=True)
    before = cache_nbytes(cache)
    assert before == 2 * 4 * 2 * 10 * 16 * 4  # k+v, layers, kv heads, tokens, head_dim, fp32
    assert decode_rate(model, cache, position=10, batch=3, steps=2) > 0
    assert cache_nbytes(cache) == before


@pytest.mark.parametrize(
    ("paths", "message"),
    [("eager,turbo", "argument --decode-paths: expected auto or"), ("", "expected auto or")],
)
def test_bad_decode_paths_fail_at_parse_time(
    paths: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench_main(["--shape", "tiny-llama", "--decode-paths", paths])
    assert message in capsys.readouterr().err


def test_graph_path_off_cuda_is_a_named_error() -> None:
    for paths, named in [
        ("eager,graphs", "graphs"),
        ("compiled", "compiled"),
        ("method,method-graphs", "method-graphs"),
    ]:
        with pytest.raises(ValueError, match=f"{named} need a CUDA device"):
            decode_path_list(paths, torch.device("cpu"))
    assert decode_path_list("auto", torch.device("cuda")) == ["eager", "graphs"]


def test_decode_paths_are_timed_on_a_copy(tiny_llama: LoadedModel) -> None:
    from transformers import DynamicCache

    model = tiny_llama.model
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.arange(1, 11)[None], **with_cache(model, cache), use_cache=True)
    keys = cache.layers[0].keys.clone()
    measured = batch1_paths(model, cache, 10, ["eager", "static"], steps=3, bandwidth=1e9)
    assert cache.get_seq_length() == 10 and torch.equal(cache.layers[0].keys, keys)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = measured["decode_memory_bound_tokens_per_s"]
    assert bound == pytest.approx(1e9 / (weights + cache_nbytes(cache)))
    for rates in measured["decode_paths_batch1"].values():
        assert rates["of_memory_bound"] == pytest.approx(rates["tokens_per_s"] / bound)


def test_the_method_path_times_the_methods_own_decoder(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samkv_integrations.bench import cli as bench_cli
    from samkv_integrations.methods.retro_attention import RetroDecoder

    built: list[type] = []
    original = bench_cli._method_decoder

    def recording(*args: Any) -> Any:
        decoder = original(*args)
        built.append(type(decoder))
        return decoder

    monkeypatch.setattr(bench_cli, "_method_decoder", recording)
    spec = DROPPING["samkv"] + "+decode=retro+retro_pages=1+retro_page_size=4"
    out = tmp_path / "bench.json"
    code = bench_main(
        ["--shape", "tiny-llama", "--device", "cpu", "--workloads", "2x32", "--methods", spec,
         "--repeats", "1", "--warmup", "0", "--decode-steps", "2", "--max-batch", "1",
         "--decode-paths", "eager,method", "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    (work,) = json.loads(out.read_text())["workloads"]
    paths = work["methods"][spec]["decode_paths_batch1"]
    assert list(paths) == ["eager", "method"] and paths["method"]["tokens_per_s"] > 0
    assert built == [RetroDecoder]
    # The engine decodes such answers one at a time: no batched rate is claimed for it.
    result = work["methods"][spec]
    assert result["decode_max_batch"] is None and result["decode_tokens_per_s_max_batch"] is None


def test_the_method_path_needs_the_methods_decoder(tiny_llama: LoadedModel) -> None:
    from transformers import DynamicCache

    from samkv_integrations.bench.throughput import decoder_rate

    cache = DynamicCache(config=tiny_llama.model.config)
    for path in ("method", "method-graphs"):
        with pytest.raises(ValueError, match=f"the {path} path needs"):
            decoder_rate(tiny_llama.model, cache, 0, path, 1)


def test_the_default_methods_include_samkv_at_both_reported_budgets() -> None:
    import argparse

    from samkv_integrations.bench.arguments import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    labels = parser.parse_args([]).methods.split(",")
    assert "samkv" in labels and "samkv+budget=0.3" in labels  # 0.15 is samkv's default
    assert set(METHODS) <= set(labels)


@pytest.mark.parametrize("decode_steps", ["0", "2"])
def test_profile_tables_are_written_with_or_without_decoding(
    tmp_path: Any, decode_steps: str
) -> None:
    profiles = tmp_path / "profiles"
    code = bench_main(
        ["--shape", "tiny-llama", "--device", "cpu", "--workloads", "2x96", "--methods",
         "full,samkv+budget=0.3", "--repeats", "1", "--warmup", "0", "--decode-steps",
         decode_steps, "--max-batch", "1", "--profile", str(profiles), "--output",
         str(tmp_path / "b.json")]
    )  # fmt: skip
    assert code == 0
    (full,) = profiles.glob("profile-2docs-*-full.txt")
    assert "Self CPU" in full.read_text() and "phase:recompute" in full.read_text()
    # The spec's '+' and '=' leave the file name. 96 tokens a document make blocks to select.
    (samkv,) = profiles.glob("profile-2docs-*-samkv_budget_0.3.txt")
    assert "phase:select" in samkv.read_text() and "samkv.question_pass" in samkv.read_text()
