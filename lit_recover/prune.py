"""``python -m lit_recover.prune``: an alias of ``lit-recover prune`` (its function: ``pruning.__main__.prune``)."""

from lit_recover.pruning.__main__ import main, prune

__all__ = ["main", "prune"]

if __name__ == "__main__":
    main()
