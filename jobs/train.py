"""Ray job entrypoint: ``python jobs/train.py --config F [--name N] ...`` = ``stylegen train ...``.

Submitted by ``stylegen submit train``; runs on the head node with RAY_ADDRESS set by Ray.
"""

import sys

from stylegen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
