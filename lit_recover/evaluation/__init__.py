"""The evaluation suite: perplexity, zero-shot accuracy (lm-eval), latency and memory of a model object.

``evaluate_model(model, tokenizer, EvalConfig(...))`` returns a plain results dict (schema in
``report.py`` and docs/evaluation.md); ``write_results`` saves it; ``with_deltas`` pairs a before and
an after. ``python -m lit_recover.evaluate`` runs the same suite on a saved model, and compares files.
"""

from lit_recover.evaluation.report import (
    compare_chart,
    compare_table,
    read_results,
    validate_results,
    with_deltas,
    write_results,
)
from lit_recover.evaluation.suite import ALL_METRICS, EvalConfig, evaluate_model, parse_metrics

__all__ = [
    "ALL_METRICS",
    "EvalConfig",
    "compare_chart",
    "compare_table",
    "evaluate_model",
    "parse_metrics",
    "read_results",
    "validate_results",
    "with_deltas",
    "write_results",
]
