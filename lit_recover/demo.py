"""``python -m lit_recover.demo``: an alias of ``lit-recover demo``."""

from lit_recover.demos.demo import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
