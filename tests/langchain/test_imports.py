"""The public API is pinned, and our ``langchain/`` source folder never stands in for LangChain."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import langchain_core

import langchain_samkv

ROOT = Path(__file__).resolve().parents[2]

EXPECTED_ALL = [
    "ChatSamKV",
    "FullPrefillWarning",
    "MiniLMEmbeddings",
    "SamKVCacheBuilder",
    "SamKVVectorStore",
    "StaleCacheKeyWarning",
    "create_samkv_rag_chain",
    "document_block",
    "document_message",
    "format_docs_as_messages",
]


def test_all_is_pinned() -> None:
    assert sorted(langchain_samkv.__all__) == sorted(EXPECTED_ALL)
    for name in EXPECTED_ALL:
        assert getattr(langchain_samkv, name).__module__.startswith("langchain_samkv.")


def test_package_is_the_source_folder_and_typed() -> None:
    package_dir = Path(langchain_samkv.__file__).parent
    assert package_dir == ROOT / "langchain" / "langchain_samkv"
    assert (package_dir / "py.typed").is_file()


def test_real_langchain_core_is_imported() -> None:
    # langchain_core is the installed distribution, not something under our source folder.
    assert "site-packages" in Path(langchain_core.__file__).parts
    assert not Path(langchain_core.__file__).is_relative_to(ROOT / "langchain")
    assert int(langchain_core.__version__.split(".")[0]) >= 1


def _import_langchain(cwd: Path, extra_path: Path | None = None) -> str:
    code = (
        "try:\n"
        "    import langchain\n"
        "except ModuleNotFoundError:\n"
        "    print('missing')\n"
        "else:\n"
        "    print(getattr(langchain, '__file__', None) or list(langchain.__path__))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={"PYTHONPATH": str(extra_path or ""), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_source_folder_has_no_init() -> None:
    # A folder without __init__.py can only ever be a namespace portion: any installed
    # (regular) ``langchain`` package takes precedence over it, wherever it is on sys.path.
    assert not (ROOT / "langchain" / "__init__.py").exists()


def test_installed_langchain_wins_over_the_source_folder(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "langchain"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    # Run from the checkout root, where ``langchain/`` comes first on sys.path.
    assert _import_langchain(ROOT, tmp_path / "site") == str(fake / "__init__.py")


def test_langchain_is_not_satisfied_outside_the_checkout(tmp_path: Path) -> None:
    found = _import_langchain(tmp_path)
    assert found == "missing" or str(ROOT / "langchain") not in found


# What only the engine's internals may touch (STYLE.md habit 15): the store and decode
# modules, the prompt framer and any private engine attribute.
INTERNALS = re.compile(r"samkv_integrations\.(store|decode)\b|\.framer\b|engine\._|\._lock\b")


def test_the_adapter_calls_the_engine_facade_only() -> None:
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted((ROOT / "langchain" / "langchain_samkv").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNALS.search(line)
    ]
    assert offenders == []
