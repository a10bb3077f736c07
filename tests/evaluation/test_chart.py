"""The comparison chart: every model that has a number gets a bar in that number's panel."""

from __future__ import annotations

import pytest

from lit_recover.evaluation.report import (
    chart_figure,
    chart_panels,
    compare_chart,
    measurement,
    new_results,
    skipped,
    training_record,
)

LABELS = ["base", "pruned", "recovered (SFT)", "recovered (distillation)"]


def measured(label: str, ppl: float, ms: float, tps: float, size: float, rss: float, latency: bool = True) -> dict:
    """Results as ``lit-recover evaluate`` writes them: perplexity, latency and memory sections."""
    res = new_results(label=label, settings={}, model={"class": "X"}, environment={"device": "cpu"})
    res["metrics"]["ppl"] = {"status": "ok", "elapsed": measurement(1.0, "s"),
                             "datasets": {"demo": measurement(ppl, "perplexity", higher_is_better=False)}}
    res["metrics"]["latency"] = {
        "status": "ok", "elapsed": measurement(1.0, "s"),
        "time_to_first_token": measurement(2 * ms, "ms", higher_is_better=False),
        "ms_per_token": measurement(ms, "ms", higher_is_better=False),
        "tokens_per_second": measurement(tps, "tokens/s", higher_is_better=True),
    } if latency else skipped("not measured")
    res["metrics"]["memory"] = {
        "status": "ok", "parameters": measurement(int(size * 1000), "count"),
        "size": measurement(size, "MiB", higher_is_better=False),
        "peak_rss": measurement(rss, "MiB", higher_is_better=False),
        "peak_cuda_allocated": skipped("no CUDA", not_applicable=True),
    }
    return res


def four_results(latency_of_pruned: bool = True) -> list[dict]:
    out = [measured("base", 29.0, 120.0, 8.0, 513.0, 2100.0),
           measured("pruned", 105.0, 95.0, 10.5, 410.0, 1800.0, latency=latency_of_pruned),
           measured("sft", 86.0, 96.0, 10.4, 410.5, 1810.0),
           measured("kd", 70.0, 97.0, 10.3, 410.5, 1820.0)]
    for res, steps in ((out[2], 12), (out[3], 8)):  # the fits' cost rows are not charted
        res["training"] = training_record(seconds=150.0, steps=steps, tokens=steps * 2000,
                                          supervised_tokens=steps * 900, max_time_s=150.0, max_steps=48)
    return out


def bars_of(ax) -> dict[str, list[float]]:
    """``{legend label: [bar heights]}`` of one panel, read from its bar containers."""
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}


def test_four_results_give_four_bars_in_every_panel():
    import matplotlib.pyplot as plt

    results = four_results()
    fig = chart_figure(results, LABELS)
    try:
        axes = fig.get_axes()
        units = [ax.get_ylabel() for ax in axes]
        assert units == ["perplexity", "ms", "tokens/s", "MiB"]  # no panel for the training rows
        expected = {
            "perplexity": [[29.0], [105.0], [86.0], [70.0]],
            "ms": [[240.0, 120.0], [190.0, 95.0], [192.0, 96.0], [194.0, 97.0]],
            "tokens/s": [[8.0], [10.5], [10.4], [10.3]],
            "MiB": [[513.0, 2100.0], [410.0, 1800.0], [410.5, 1810.0], [410.5, 1820.0]],
        }
        for ax in axes:
            bars = bars_of(ax)
            assert list(bars) == LABELS, ax.get_ylabel()  # all four models, in column order
            assert [bars[label] for label in LABELS] == expected[ax.get_ylabel()]
            # a model keeps its colour from panel to panel
            colours = [c.patches[0].get_facecolor() for c in ax.containers]
            assert len(set(colours)) == 4
            assert colours == [c.patches[0].get_facecolor() for c in axes[0].containers]
            assert [t.get_text() for t in ax.get_legend().get_texts()] == LABELS
    finally:
        plt.close(fig)


def test_a_model_without_a_number_gets_no_bar_but_a_mark():
    import matplotlib.pyplot as plt

    results = four_results(latency_of_pruned=False)
    panels = chart_panels(results)
    assert panels["ms"] == [("latency time_to_first_token", [240.0, None, 192.0, 194.0]),
                            ("latency ms_per_token", [120.0, None, 96.0, 97.0])]
    fig = chart_figure(results, LABELS)
    try:
        ms = next(ax for ax in fig.get_axes() if ax.get_ylabel() == "ms")
        bars = bars_of(ms)
        assert bars["pruned"] == [] and bars["base"] == [240.0, 120.0]  # no zero-height stand-in
        assert [t.get_text() for t in ms.texts if t.get_text() == "n/a"] == ["n/a", "n/a"]
        assert [t.get_text() for t in ms.get_legend().get_texts()] == LABELS  # still named in the legend
        perplexity = next(ax for ax in fig.get_axes() if ax.get_ylabel() == "perplexity")
        assert len(bars_of(perplexity)["pruned"]) == 1
    finally:
        plt.close(fig)


def test_labels_must_match_the_results(tmp_path):
    with pytest.raises(ValueError, match="3 labels for 4 results"):
        compare_chart(four_results(), LABELS[:3], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
    path = compare_chart(four_results(), LABELS, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
