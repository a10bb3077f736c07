"""``python -m lit_recover.evaluate``: an alias of ``lit-recover evaluate``, and with ``--compare`` of ``compare``.

    python -m lit_recover.evaluate --model_path pruned_model.bin --metrics all --output pruned.json
    python -m lit_recover.evaluate --compare base.json pruned.json recovered.json --labels base,pruned,recovered

The commands and their options live in :mod:`lit_recover.evaluation.command`.
"""

import sys

from lit_recover.evaluation.command import compare, evaluate, main

__all__ = ["compare", "evaluate", "main"]

if __name__ == "__main__":
    sys.exit(main())
