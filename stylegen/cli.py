"""``stylegen`` entry point: argparse subcommands, each implemented in its own module.

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int`` and
imports its heavy dependencies (torch, ray) inside ``run``, so ``stylegen --help``
stays fast. Importing this file has no side effects.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from stylegen import __version__
from stylegen.errors import UserError

# command -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "shard": ("stylegen.data.shard", "turn image folders / ImageNet64 npz into WebDataset shards (+ 'shard verify DIR')"),
    "config": ("stylegen.config_cli", "show the resolved config ('config show')"),
    "train": ("stylegen.train.cli", "train the generator (--local: one process; else Ray Train DDP)"),
    "tune": ("stylegen.tune", "Ray Tune sweep over the loss weights"),
    "best": ("stylegen.best", "best trial/checkpoint of a finished (or running) sweep or run, offline"),
    "stylize": ("stylegen.stylize", "stylize images with a checkpoint (default: the shipped model)"),
    "export": ("stylegen.export", "export a checkpoint (or a sweep's best) as ONNX with dynamic height and width"),
    "eval": ("stylegen.evaluate", "content/style/PSNR metrics of a checkpoint against reference points"),
    "serve": ("stylegen.serve", "serve the generator over HTTP on Ray Serve: POST /stylize and a web page at /"),
    "submit": ("stylegen.submit", "submit a train, tune or serve job to a Ray cluster (token auth)"),
    "prometheus": ("stylegen.prom", "run Prometheus on loopback with infra/prometheus config"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``stylegen CMD: error: ...``) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All commands' arguments, or with ``only`` just that command's (the others' modules are not
    imported: `stylegen best s3://...` then skips numpy, PIL and the rest, ~1 s of start-up)."""
    parser = OneLineParser(prog="stylegen", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"stylegen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only is None or name == only:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # top-level options are flags only
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as e:
        print(f"stylegen {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"stylegen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
