"""Benchmarks beside the product, run from the repository checkout and never installed
(``setup.py`` packages ``nnunet_te*`` only): the figure scripts (``python benchmarks/bench_*.py``)
and the real benchmark, ``python -m benchmarks.finetune_grid`` (docs/benchmark.md)."""
