"""Former name of :mod:`stylegen.best`, kept only while ``cli.COMMANDS["best"]`` still names it.

Delete this file once that entry reads ``"stylegen.best"``.
"""

from stylegen.best import add_arguments, run  # noqa: F401
