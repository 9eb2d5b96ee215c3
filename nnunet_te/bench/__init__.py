"""The real benchmark (issue 5): a 2D model zoo, few-shot fine-tuning ground truth through the
product's nnU-Net trainers, ranking quality, cost and risk weighting, written to
``docs/benchmark.md``. Entry point: ``nnunet-te bench`` (:func:`nnunet_te.bench.run.run_bench`)."""
