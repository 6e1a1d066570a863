"""``python -m memkd``: the memkd command line (see memkd.cli)."""
import sys

from memkd.cli import main

if __name__ == "__main__":
    sys.exit(main())
