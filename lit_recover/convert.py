"""``python -m lit_recover.convert SOURCE TARGET``: an alias of ``lit-recover convert``."""

from lit_recover.models.convert import convert, main

__all__ = ["convert", "main"]

if __name__ == "__main__":
    main()
