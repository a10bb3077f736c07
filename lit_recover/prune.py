"""``python -m lit_recover.prune``: the structural pruner's command line (see ``lit_recover.pruning.__main__``)."""

from lit_recover.pruning.__main__ import main, prune

__all__ = ["main", "prune"]

if __name__ == "__main__":
    main()
