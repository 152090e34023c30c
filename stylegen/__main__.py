"""``python -m stylegen`` = the ``stylegen`` console script."""

import sys

from stylegen.cli import main

if __name__ == "__main__":
    sys.exit(main())
