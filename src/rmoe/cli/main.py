"""The `rmoe` command: one entry point, one module per subcommand.

Each subcommand module under `rmoe.cli` defines
    add_parser(subparsers) -> argparse.ArgumentParser   (help text with an example)
    run(args) -> int                                     (exit status)
and is listed in `COMMANDS`. Modules are imported lazily so `rmoe --help` stays fast.
Library errors (ValueError, FileNotFoundError, KeyError from configs) become one clear line on
stderr and exit status 2, without a traceback (set RMOE_DEBUG=1 to see it); so does a missing
optional dependency, whose line names the extra to install (`rmoe.extras`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, str] = {
    "train": "rmoe.cli.train",
    "eval": "rmoe.cli.evaluate",
    "generate": "rmoe.cli.generate",
    "info": "rmoe.cli.info",
    "analyze": "rmoe.cli.analyze",
    "finetune": "rmoe.cli.finetune",
    "continual": "rmoe.cli.continual",
    "experiment": "rmoe.cli.experiment",
    "bench": "rmoe.cli.bench",
    "export": "rmoe.cli.export",
    "import": "rmoe.cli.import_hf",
    "upcycle": "rmoe.cli.upcycle",
    "verify": "rmoe.cli.verify",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="rmoe",
        description="Mixture-of-Experts language models with the layerwise recurrent router.",
        epilog="Example: rmoe train tiny --out runs/demo && rmoe eval runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # subcommand not part of this build
                continue
            raise
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the subcommand, turn library errors into one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # transformers' per-file save/load progress bars drown rmoe's own progress output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        if os.environ.get("RMOE_DEBUG"):
            raise
        print(f"rmoe {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:  # an optional dependency (an extra) is not installed
        from rmoe.extras import missing_extra_message

        message = missing_extra_message(exc, f"rmoe {args.command}")
        if message is None or os.environ.get("RMOE_DEBUG"):
            raise
        prefix = f"rmoe {args.command}"
        print(message if message.startswith(prefix) else f"{prefix}: {message}", file=sys.stderr)
        return 2


def _one_line(exc: Exception) -> str:
    """The message of a library error; a folder that is a file (mkdir's FileExistsError,
    NotADirectoryError) says so in words instead of ``[Errno 17] File exists: 'x'``."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename:
        return (
            f"{exc.filename} is a file where a folder is needed; pass the path of a new or "
            "existing folder (or move the file away)"
        )
    return str(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
