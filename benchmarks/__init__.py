"""Benchmarks of lit-recover against the reference recipe, run from the repository root as modules:
``python -m benchmarks.bench_fit``, ``python -m benchmarks.bench_ppl``,
``python -m benchmarks.reference_trainer``.

- ``meter``: the per-step meter and the resident-memory readers, used inside a measured process;
- ``report``: per-run summaries, ratios, the loss check, the markdown tables and the result files;
- ``common``: paths, the hardware record, the records subset, names and commands of results;
- ``bench_fit`` (the training benchmark) and ``fit_workers`` (its measured runs, one per process);
- ``bench_ppl``: the perplexity benchmark;
- ``bench_fsdp_load`` and ``fsdp_load_worker`` (one rank): host memory of FSDP2 ranks while loading;
- ``reference_trainer``: the reference recipe (transformers ``Trainer`` + PEFT LoRA).
"""
