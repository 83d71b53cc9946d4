"""The ``samkv`` command line: index, ask, eval, bench, and the commands apps contribute.

Each heavy subcommand lives in its own module and is imported only when it runs, so
``samkv --help`` stays fast. Apps outside the library (the Chroma demo's ``demo`` and
``serve``) contribute subcommands through the ``samkv.commands`` entry-point group, so the
library never imports them.

Every command fails the same way: a mistake in what the user gave (an argument, a file,
a question) or an environment that cannot do it (no CUDA, an unwritable directory, an
unusable stored cache) ends as one line on stderr, ``samkv <command>: error: <what>``, and
a non-zero status (see ``main``). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from samkv_integrations.errors import CacheError
from samkv_integrations.framing import checked_text
from samkv_integrations.methods import DEFAULT_METHOD

if TYPE_CHECKING:
    from samkv_integrations.engine import SamKVEngine
    from samkv_integrations.records import CacheRef

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Entry-point group through which other packages add subcommands.
COMMANDS_GROUP = "samkv.commands"

#: The library's own delegated subcommands: name -> (module, summary); each module has
#: ``add_arguments(parser)`` and ``run(args)``.
_BUILTIN = {
    "eval": ("samkv_integrations.eval.cli", "Measure methods' accuracy against full recompute."),
    "bench": ("samkv_integrations.bench.cli", "Measure TTFT, memory and throughput per method."),
    "cache": ("samkv_integrations.cache_cli", "List, verify and garbage-collect stored KV caches."),
}


def delegated_commands() -> dict[str, tuple[str, str]]:
    """Built-in delegated subcommands plus those registered under ``samkv.commands``.

    A plugin's summary is the first line of its module docstring, read when it runs.
    """
    commands = {
        entry.name: (entry.value, f"contributed by {entry.value}; see its --help")
        for entry in entry_points(group=COMMANDS_GROUP)
    }
    commands.update(_BUILTIN)
    return commands


def _read_documents(paths: Sequence[str]) -> list[str]:
    """Each file's text; a missing, unreadable, non-UTF-8 or empty file is a ``ValueError``."""
    texts = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            problem = "is a directory" if path.is_dir() else "no such file"
            raise ValueError(f"{name}: {problem}; give text files, one document each")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{name}: cannot read it ({e.strerror or e})") from e
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{name}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})"
            ) from None
        if not text.strip():
            raise ValueError(f"{name}: the file is empty")
        texts.append(text)
    return texts


def _typed(check: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type=`` from a check that raises ``ValueError`` (argparse names the option)."""

    def parse(text: str) -> T:
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = check.__name__
    return parse


def int_at_least(low: int) -> Callable[[str], int]:
    """Argparse ``type=`` for an integer ``>= low``; a bad value is a parse error naming the option."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
        if value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value

    check.__name__ = f"int_at_least_{low}"
    return _typed(check)


def port_number(text: str) -> int:
    """Argparse ``type=`` for a TCP port, 1 to 65535."""
    port = int_at_least(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {port}")
    return port


def number_at_least(low: float) -> Callable[[str], float]:
    """Argparse ``type=`` for a finite number ``>= low``."""

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low:
            raise ValueError(f"must be a finite number >= {low}, got {text}")
        return value

    check.__name__ = f"number_at_least_{low}"
    return _typed(check)


def _not_empty(text: str) -> str:
    # An empty --store would be the current directory.
    if not text.strip():
        raise ValueError("is empty")
    return text


#: Argparse ``type=`` for an option that must not be empty (``--model``, ``--store``, paths).
not_empty = _typed(_not_empty)


def _question_text(text: str) -> str:
    return checked_text(text, "question")


_question = _typed(_question_text)


def add_engine_arguments(
    parser: argparse.ArgumentParser,
    *,
    model_default: str | None = None,
    store_help: str = "KV cache store directory or fsspec URL (default: $SAMKV_HOME/kvcache)",
    model_group: argparse._MutuallyExclusiveGroup | None = None,
) -> None:
    """Add ``--model``, ``--device`` and ``--store``, the engine options every command shares.

    Args:
        parser: The command's parser.
        model_default: The command's default model (``None``: the embedded SmolLM2-135M).
        store_help: The help of ``--store``, for a command whose default store differs.
        model_group: A mutually exclusive group of ``parser`` to put ``--model`` in (e.g.
            beside the bench's ``--shape``).
    """
    default = model_default or "embedded SmolLM2-135M"
    (model_group or parser).add_argument(
        "--model",
        type=not_empty,
        default=model_default,
        help=f"registry name, local path, .gguf file, hub id or random:<shape> (default: {default})",
    )
    parser.add_argument(
        "--device",
        type=not_empty,
        default=None,
        help="cpu, cuda or cuda:N (default: cuda when available)",
    )
    parser.add_argument("--store", type=not_empty, default=None, help=store_help)


def _spec_error(e: ValueError) -> argparse.ArgumentTypeError:
    # argparse names the argument ("argument --method: ..."): the spec's message follows.
    return argparse.ArgumentTypeError(str(e).removeprefix("methods: "))


def method_spec(text: str) -> str:
    """Argparse ``type=`` for one method spec, ``name[+option=value...]``.

    Returns the spec unchanged once it is valid, so that a bad method, option or value is
    an argparse error (exit status 2, naming the option) before any model loads.
    """
    from samkv_integrations.methods.specs import parse_spec

    try:
        return parse_spec(text.strip()).label
    except ValueError as e:
        raise _spec_error(e) from None


def method_specs(text: str) -> str:
    """Argparse ``type=`` for comma-separated method specs, validated like ``method_spec``.

    Returns the text unchanged; ``parse_methods`` turns it into specs where it runs.
    """
    from samkv_integrations.methods.specs import parse_methods

    try:
        parse_methods(text, reference=False)
    except ValueError as e:
        raise _spec_error(e) from None
    return text


def _engine_over(args: argparse.Namespace) -> tuple[SamKVEngine, list[str], list[CacheRef]]:
    """Read ``args.files`` (before any model loads), load the engine, and ref each text.

    A text too long for the model is an error naming its file.
    """
    from samkv_integrations import SamKVEngine

    texts = _read_documents(args.files)
    engine = SamKVEngine.from_pretrained(args.model, args.store, device=args.device)
    refs = [engine.cache_ref(t, label=n) for n, t in zip(args.files, texts, strict=True)]
    return engine, texts, refs


def _unusable(engine: SamKVEngine, refs: Sequence[CacheRef]) -> int:
    """How many refs the store holds no usable cache of: ``index`` encodes those."""
    prefix_len = len(engine.framer.prefix_ids())
    count = 0
    for ref in refs:
        try:
            engine.store.verify(ref.key, fingerprint=engine.fingerprint, prefix_len=prefix_len)
        except CacheError:
            count += 1
    return count


def _index(args: argparse.Namespace) -> int:
    engine, texts, _ = _engine_over(args)
    refs = engine.index(texts)
    for name, ref in zip(args.files, refs, strict=True):
        shown = name.encode("utf-8", "backslashreplace").decode()  # undecodable bytes in argv
        print(f"{ref.key}  {ref.n_tokens:6d} tokens  {shown}")
    return 0


def _ask(args: argparse.Namespace) -> int:
    engine, texts, refs = _engine_over(args)
    encoded = _unusable(engine, refs)
    refs = engine.index(texts, progress=False)
    stream = engine.stream(args.question, refs, args.method, max_new_tokens=args.max_new_tokens)
    for delta in stream:
        print(delta, end="", flush=True)
    stats = stream.stats
    summary = (
        f"\n[{args.method}] TTFT {stats.ttft_s * 1000:.0f} ms, kept {stats.kept_fraction:.0%} "
        f"of {stats.context_tokens} context tokens, recomputed {stats.recomputed_fraction:.0%}"
    )
    # Whole documents encoded because no stored cache was usable: apart from the method's
    # recompute, before the answer (not in TTFT) or while loading it (in TTFT).
    if encoded:
        summary += f"; encoded {encoded} of {len(refs)} documents first (no usable stored cache)"
    if stats.recomputed_documents:
        summary += f"; re-encoded {stats.recomputed_documents} of {len(refs)} while answering"
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="samkv", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="Compute and store KV caches of text files.")
    add_engine_arguments(index)
    index.add_argument("files", nargs="+", help="text files, one document each")
    index.set_defaults(handler=_index)

    ask = commands.add_parser("ask", help="Answer a question from text files through their caches.")
    add_engine_arguments(ask)
    ask.add_argument(
        "--method",
        type=method_spec,
        default=DEFAULT_METHOD,
        metavar="SPEC",
        help="method spec name[+option=value...], e.g. samkv+budget=0.2 (default: %(default)s)",
    )
    ask.add_argument("--max-new-tokens", type=int_at_least(1), default=128)
    ask.add_argument("question", type=_question)
    ask.add_argument("files", nargs="+", help="text files, one document each")
    ask.set_defaults(handler=_ask)

    for name, (module, summary) in delegated_commands().items():
        sub = commands.add_parser(name, help=summary, description=summary, add_help=False)
        sub.set_defaults(delegate=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samkv`` console script; returns the exit status.

    Exit status: 0 done; 2 a bad argument, file or question (``ValueError``, argparse's
    errors included); 1 the environment or the store could not do it (``OSError``,
    ``CacheError``); 130 interrupted. Each error is one line on stderr (``-v`` adds its
    traceback); any other exception is a bug and propagates with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # A delegated subcommand's own arguments are split off before parsing, and parsed by
    # its module's parser (so `samkv --help` imports nothing heavy).
    delegated = delegated_commands()
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    rest: list[str] = []
    if at < len(argv) and argv[at] in delegated:
        argv, rest = argv[: at + 1], argv[at + 1 :]
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    prog = f"samkv {args.command}"
    hint = ""
    try:
        if not hasattr(args, "delegate"):
            return int(args.handler(args))
        module = importlib.import_module(args.delegate)
        hint = getattr(module, "INTERRUPT_HINT", "")
        summary = (module.__doc__ or delegated[args.command][1]).strip().splitlines()[0]
        sub = argparse.ArgumentParser(prog=prog, description=summary)
        module.add_arguments(sub)
        return int(module.run(sub.parse_args(rest)) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, OSError, CacheError) as e:
        logger.info("%s failed", prog, exc_info=True)  # the traceback, with -v
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


def _one_line(error: BaseException) -> str:
    """The error's message on one line (an ``OSError`` with its path)."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename is not None else ""
        text = f"{where}{error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
