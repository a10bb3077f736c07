"""The evaluation suite: perplexity, zero-shot accuracy (lm-eval), latency and memory of a model object.

``evaluate_model(model, tokenizer, EvalConfig(...))`` returns a plain results dict (schema in
``report.py`` and docs/evaluation.md); ``write_results`` saves it; ``with_deltas`` pairs a before and
an after. ``lit-recover evaluate`` runs the same suite on a saved model, and ``lit-recover compare``
compares files.

Imports are lazy: ``import lit_recover.evaluation.report`` loads neither torch nor lm-eval.
"""

from __future__ import annotations

import importlib
from typing import Any

_REPORT = "lit_recover.evaluation.report"
_SUITE = "lit_recover.evaluation.suite"
_LAZY = {
    "compare_chart": _REPORT,
    "compare_table": _REPORT,
    "failure_box": _REPORT,
    "MissingMetricsError": _REPORT,
    "missing_metrics": _REPORT,
    "raise_if_missing": _REPORT,
    "read_results": _REPORT,
    "validate_results": _REPORT,
    "with_deltas": _REPORT,
    "write_results": _REPORT,
    "ALL_METRICS": _SUITE,
    "EvalConfig": _SUITE,
    "evaluate_model": _SUITE,
    "parse_metrics": _SUITE,
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_recover.evaluation' has no attribute {name!r}")
