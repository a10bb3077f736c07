"""Convert between the pruned pickle and the pickle-free pruned folder.

    lit-recover convert pruned_model.bin pruned_folder/          # pickle -> folder
    lit-recover convert pruned_folder/ pruned_model.bin          # folder -> pickle
    lit-recover convert old.bin new_folder/ --overwrite true

The pickle is read safely (nothing in it runs) unless ``--trust_pickle true``. The pickle written for
tools that expect one holds classes of the installed transformers, exactly as ``save_pruned`` does.
An existing target is never replaced without ``--overwrite true``. ``python -m lit_recover.convert`` is
the same command.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from lit_recover.errors import exit_on_user_error
from lit_recover.models.checks import PrunedModelError, check_forward, check_structure
from lit_recover.models.load import read_model, save_pruned

log = logging.getLogger(__name__)


def convert(
    source: str,
    target: str,
    to: Literal["auto", "folder", "pickle"] = "auto",
    overwrite: bool = False,
    trust_pickle: bool = False,
    check: bool = True,
) -> Path:
    """Convert a pruned model from one storage form to the other.

    Args:
        source: a ``pruned_model.bin`` pickle, a pruned folder, a Hugging Face folder or hub id.
        target: the folder (or pickle file) to write.
        to: ``folder`` or ``pickle``; ``auto`` writes a folder from a file and a pickle from a folder.
        overwrite: replace an existing target.
        trust_pickle: unpickle the source as written (runs code it names) instead of rebuilding it safely.
        check: run the structural and forward checks on the model before writing it.

    Returns:
        The path written.
    """
    from lit_recover.models.folder import save_pruned_folder

    kind = to if to != "auto" else ("pickle" if Path(source).is_dir() else "folder")
    out = Path(target)
    if kind == "pickle" and out.exists() and not overwrite:
        raise PrunedModelError(f"{out}: exists; pass --overwrite true to replace it")
    if kind == "pickle" and out.is_dir():
        raise PrunedModelError(f"{out}: is a folder; a pickle needs a file path")
    model, tokenizer = read_model(source, trust_pickle=trust_pickle)
    if check:
        check_structure(model, source)
        check_forward(model, tokenizer, source)
    if kind == "folder":
        save_pruned_folder(model, tokenizer, out, overwrite=overwrite)
    else:
        save_pruned(model, tokenizer, out)
    log.info("converted %s -> %s (%s)", source, out, kind)
    return out


def main(argv: list[str] | None = None, prog: str = "python -m lit_recover.convert") -> Path:
    """``lit-recover convert SOURCE TARGET [--to ...] [--overwrite true]``: parse ``argv``, convert, print the path."""
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = exit_on_user_error(CLI, convert, args=argv, as_positional=True, prog=prog, exit_on_error=False)
    print(out)
    return out


if __name__ == "__main__":
    main()
