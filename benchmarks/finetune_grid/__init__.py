"""The real benchmark (issue 5): a 2D model zoo, few-shot fine-tuning ground truth through the
product's nnU-Net trainers, ranking quality, cost and risk weighting, written to
``docs/benchmark.md``. It lives beside the package, not in it: it encodes the project's own goals
and rewrites the project's docs, and runs from the repository checkout. Entry point:
``python -m benchmarks.finetune_grid`` (:mod:`benchmarks.finetune_grid.__main__`, which calls
:func:`benchmarks.finetune_grid.run.run_bench`)."""
