"""``python -m lit_recover.evaluation``: the same command as ``python -m lit_recover.evaluate``."""

import sys

from lit_recover.evaluation.command import main

if __name__ == "__main__":
    sys.exit(main())
