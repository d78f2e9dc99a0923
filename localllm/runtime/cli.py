"""The `localllm` command line.

Each subcommand is one `_cmd_*` function taking the parsed arguments and returning an exit
status, plus one entry in `_SUBCOMMANDS` that declares its arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable

from localllm.errors import LocalLLMError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _cmd_pull(args: argparse.Namespace) -> int:
    from localllm.runtime.catalog import lookup, pull

    # Validate every name first so a typo in the last one does not waste a long download.
    for name in args.names:
        lookup(name)
    for name in args.names:
        path = pull(name, progress=not args.quiet)
        print(f"{name}: {path}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from rich import box
    from rich.filesize import decimal
    from rich.table import Table

    from localllm.runtime.catalog import list_models, store_dir

    table = Table(title=f"models in {store_dir()}  (* = default)", box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True)
    table.add_column("arch", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("present", no_wrap=True)
    table.add_column("file", overflow="fold")
    for listing in list_models():
        entry = listing.entry
        table.add_row(
            f"{entry.name}{' *' if entry.default else ''}",
            entry.architecture,
            decimal(entry.bytes),
            "yes" if listing.present else "no",
            listing.path.name,
        )
    _console().print(table)
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from localllm.runtime.catalog import remove

    print(f"removed {remove(args.name)}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from localllm.runtime.catalog import ensure_model
    from localllm.runtime.info import model_info, render_info

    info = model_info(ensure_model(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        render_info(info, _console())
    return 0


def _args_pull(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="catalog model name")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def _args_rm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="catalog model name")


def _args_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="catalog name or path to a .gguf file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


_SUBCOMMANDS: list[
    tuple[
        str,
        str,
        Callable[[argparse.ArgumentParser], None] | None,
        Callable[[argparse.Namespace], int],
    ]
] = [
    ("pull", "download and verify catalog models", _args_pull, _cmd_pull),
    ("list", "show the catalog and which models are in the store", None, _cmd_list),
    ("rm", "delete a model from the store", _args_rm, _cmd_rm),
    ("info", "describe a model: hyperparameters, tokenizer, tensor types", _args_info, _cmd_info),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localllm", description="Local LLM inference from GGUF files."
    )
    debug_help = "show full tracebacks for errors"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Also accepted after the subcommand; SUPPRESS keeps the subparser from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_arguments, handler in _SUBCOMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common])
        if add_arguments is not None:
            add_arguments(sub)
        sub.set_defaults(handler=handler)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except LocalLLMError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"localllm: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader (`| head`) went away; point stdout at devnull so the exit flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
