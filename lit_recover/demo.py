"""``python -m lit_recover.demo``: an alias of ``lit-recover demo`` (the function: ``lit_recover.demos.demo.demo``)."""

from lit_recover.demos.demo import demo, main

__all__ = ["demo", "main"]

if __name__ == "__main__":
    main()
