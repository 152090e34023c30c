"""``stylegen config show [--config F] [--set k=v ...]``: print the resolved config as TOML."""

from __future__ import annotations

import argparse

from stylegen.config import load_config, to_toml


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config/--set, shared by every command that reads a config."""
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable); values are TOML (e.g. 3, 1e-3, true, [\"relu1_1\"])")


def flag_overrides(args: argparse.Namespace, pairs: list[tuple[str, str]]) -> list[str]:
    """``--set``-style overrides for the command-line flags that were given: (attribute, 'section.key')."""
    out = []
    for attr, key in pairs:
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show"], help="show: print the resolved config")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    print(to_toml(load_config(args.config, args.overrides)), end="")
    return 0
