"""``python -m memkd.cli``: the memkd command line, as ``memkd`` and ``python -m memkd``."""
import sys

from memkd.cli import main

if __name__ == "__main__":
    sys.exit(main())
