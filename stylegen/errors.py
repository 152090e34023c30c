"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input, a wrong path, an unreachable cluster...: the message names the problem and the fix."""

    exit_code = 2
