"""Placeholder: being written (see the open issues)."""


def add_arguments(p):
    pass


def run(args):
    raise SystemExit("not implemented yet")
