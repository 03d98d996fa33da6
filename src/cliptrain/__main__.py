"""`python -m cliptrain ...` (and `torchrun ... -m cliptrain train ...`): the command line."""
import sys

from cliptrain.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
