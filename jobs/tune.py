"""Ray job entrypoint: ``python jobs/tune.py --config F [--name N] ...`` = ``stylegen tune ...``.

Submitted by ``stylegen submit tune``; runs on the head node with RAY_ADDRESS set by Ray.
"""

import sys

from stylegen.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
