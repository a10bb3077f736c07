"""Prompt templates: the built-in Alpaca-style ones and JSON template files, rendering, response splitting.

A template is alpaca-lora's JSON format::

    {"description": "...",                       # optional
     "prompt_input": "... {instruction} ... {input} ...",
     "prompt_no_input": "... {instruction} ...",
     "response_split": "### Response:"}

Placeholders use Python ``str.format`` syntax (write ``{{`` / ``}}`` for literal braces). Only
``{instruction}`` and ``{input}`` are allowed; a template that drops ``{instruction}`` (or
``{input}`` from ``prompt_input``) is rejected so that a typo cannot silently lose a field.

``load_template(name)`` resolves, in order:

1. a path to a ``.json`` file (anything ending in ``.json`` or containing a path separator);
2. a bare name ``custom`` as ``./templates/custom.json`` in the working directory;
3. a built-in template shipped in this package (``alpaca``, ``alpaca_short``, ``vigogne``).
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path

from lit_recover.errors import LitRecoverError

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
"""Where the built-in templates live (package data)."""

DEFAULT_TEMPLATE = "alpaca"

_REQUIRED_KEYS = ("prompt_input", "prompt_no_input", "response_split")
_FIELDS = {"prompt_input": {"instruction", "input"}, "prompt_no_input": {"instruction"}}


class TemplateError(LitRecoverError, ValueError):
    """A template that cannot be found or used, with a one-line reason naming it."""


def builtin_templates() -> list[str]:
    """Names of the templates shipped with the package, sorted."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def _placeholders(text: str, source: str, key: str) -> set[str]:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as exc:  # unbalanced braces
        raise TemplateError(
            f"{source}: '{key}' is not a valid format string ({exc}); write literal braces as {{{{ }}}}"
        ) from None


@dataclass(frozen=True)
class PromptTemplate:
    """An Alpaca-style prompt template.

    Attributes:
        name: where it came from (a built-in name or a file path), for messages.
        prompt_input: the prompt for records with a non-empty ``input``.
        prompt_no_input: the prompt for records without ``input``.
        response_split: the marker after which the model's response starts.
        description: free text.
    """

    name: str
    prompt_input: str
    prompt_no_input: str
    response_split: str
    description: str = ""

    @classmethod
    def from_dict(cls, data: object, source: str) -> PromptTemplate:
        """Build and check a template from a parsed JSON object; ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise TemplateError(f"{source}: a template must be a JSON object, found {type(data).__name__}")
        for key in _REQUIRED_KEYS:
            if key not in data:
                raise TemplateError(f"{source}: missing key '{key}' (needs {', '.join(_REQUIRED_KEYS)})")
        for key in (*_REQUIRED_KEYS, "description"):
            if key in data and not isinstance(data[key], str):
                raise TemplateError(f"{source}: '{key}' is a {type(data[key]).__name__}, expected a string")
        if not data["response_split"].strip():
            raise TemplateError(f"{source}: 'response_split' is empty")
        for key, allowed in _FIELDS.items():
            used = _placeholders(data[key], source, key)
            unknown = used - allowed
            if unknown:
                raise TemplateError(
                    f"{source}: '{key}' uses unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
                )
            missing = allowed - used
            if missing:
                raise TemplateError(f"{source}: '{key}' does not use {sorted(missing)}")
        return cls(
            name=source,
            prompt_input=data["prompt_input"],
            prompt_no_input=data["prompt_no_input"],
            response_split=data["response_split"],
            description=data.get("description", ""),
        )

    def render(self, instruction: str, input: str | None = None, output: str | None = None) -> str:
        """The prompt for a record, followed by ``output`` when given (the training text).

        Args:
            instruction: the task.
            input: optional context; ``None`` or ``""`` selects ``prompt_no_input``.
            output: the response to append, or ``None`` for the prompt alone (generation).
        """
        if input:
            text = self.prompt_input.format(instruction=instruction, input=input)
        else:
            text = self.prompt_no_input.format(instruction=instruction)
        return text + output if output else text

    def get_response(self, output_text: str) -> str:
        """The response part of a generated text: what follows the first ``response_split``, stripped.

        As in alpaca-lora, the text is cut at a second occurrence of the marker (a model that goes on
        to write another turn). Raises ``ValueError`` when the marker is absent rather than guessing.
        """
        parts = output_text.split(self.response_split)
        if len(parts) < 2:
            raise ValueError(f"response marker {self.response_split!r} not found in the generated text")
        return parts[1].strip()


def resolve_template_path(name: str, workdir: str | Path | None = None) -> Path:
    """The JSON file a template name or path refers to (see the module docstring for the order).

    Args:
        name: a built-in name, a bare name looked up in ``<workdir>/templates/``, or a path.
        workdir: the directory whose ``templates/`` is searched; defaults to the working directory.
    """
    if not name:
        raise TemplateError("prompt template name is empty")
    if name.endswith(".json") or "/" in name or "\\" in name:
        path = Path(name)
        if not path.is_file():
            raise TemplateError(f"prompt template file {name}: no such file")
        return path
    local = Path(workdir if workdir is not None else Path.cwd()) / "templates" / f"{name}.json"
    builtin = TEMPLATE_DIR / f"{name}.json"
    if local.is_file():
        if builtin.is_file():
            log.info("prompt template %s: using %s, which shadows the built-in of that name", name, local)
        return local
    if builtin.is_file():
        return builtin
    raise TemplateError(
        f"unknown prompt template '{name}': no templates/{name}.json in the working directory and no built-in "
        f"of that name (built-ins: {', '.join(builtin_templates())})"
    )


def load_template(name: str = DEFAULT_TEMPLATE, workdir: str | Path | None = None) -> PromptTemplate:
    """Load a prompt template by name or path.

    Args:
        name: ``alpaca`` (default), ``alpaca_short``, ``vigogne``, a bare name resolved as
            ``./templates/<name>.json``, or a path to a JSON template file.
        workdir: the directory whose ``templates/`` is searched; defaults to the working directory.
    """
    path = resolve_template_path(name, workdir)
    source = name if path.parent == TEMPLATE_DIR else str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    template = PromptTemplate.from_dict(data, source)
    log.debug("prompt template %s from %s", name, path)
    return template
