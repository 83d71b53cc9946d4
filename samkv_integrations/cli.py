"""The ``samkv`` command line: index, ask, eval, bench, and the commands apps contribute.

Each heavy subcommand lives in its own module and is imported only when it runs, so
``samkv --help`` stays fast. Apps outside the library (the Chroma demo's ``demo`` and
``serve``) contribute subcommands through the ``samkv.commands`` entry-point group, so the
library never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from samkv_integrations.methods import DEFAULT_METHOD

#: Entry-point group through which other packages add subcommands.
COMMANDS_GROUP = "samkv.commands"

#: The library's own delegated subcommands: name -> (module, summary); each module has
#: ``add_arguments(parser)`` and ``run(args)``.
_BUILTIN = {
    "eval": ("samkv_integrations.eval.cli", "Measure methods' accuracy against full recompute."),
    "bench": ("samkv_integrations.bench.cli", "Measure TTFT, memory and throughput per method."),
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
    texts = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"samkv: no such file: {name}")
        texts.append(path.read_text(encoding="utf-8"))
    return texts


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
        default=model_default,
        help=f"registry name, local path, .gguf file, hub id or random:<shape> (default: {default})",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)"
    )
    parser.add_argument("--store", default=None, help=store_help)


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


def _index(args: argparse.Namespace) -> int:
    from samkv_integrations import SamKVEngine

    engine = SamKVEngine.from_pretrained(args.model, args.store, device=args.device)
    refs = engine.index(_read_documents(args.files))
    for name, ref in zip(args.files, refs, strict=True):
        print(f"{ref.key}  {ref.n_tokens:6d} tokens  {name}")
    return 0


def _ask(args: argparse.Namespace) -> int:
    from samkv_integrations import SamKVEngine

    engine = SamKVEngine.from_pretrained(args.model, args.store, device=args.device)
    refs = engine.index(_read_documents(args.files), progress=False)
    stream = engine.stream(args.question, refs, args.method, max_new_tokens=args.max_new_tokens)
    for delta in stream:
        print(delta, end="", flush=True)
    stats = stream.stats
    print(
        f"\n[{args.method}] TTFT {stats.ttft_s * 1000:.0f} ms, kept {stats.kept_fraction:.0%} "
        f"of {stats.context_tokens} context tokens, recomputed {stats.recomputed_fraction:.0%}"
    )
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
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("question")
    ask.add_argument("files", nargs="+", help="text files, one document each")
    ask.set_defaults(handler=_ask)

    for name, (module, summary) in delegated_commands().items():
        sub = commands.add_parser(name, help=summary, description=summary, add_help=False)
        sub.set_defaults(delegate=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samkv`` console script."""
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
    if hasattr(args, "delegate"):
        module = importlib.import_module(args.delegate)
        summary = (module.__doc__ or delegated[args.command][1]).strip().splitlines()[0]
        sub = argparse.ArgumentParser(prog=f"samkv {args.command}", description=summary)
        module.add_arguments(sub)
        return int(module.run(sub.parse_args(rest)) or 0)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
