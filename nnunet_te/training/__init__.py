"""Training with nnU-Net: RiskWeightedTrainer and its variants, the data plumbing that carries
risk maps through augmentation, their options, few-shot splits, and the hand-off from a ranking
to a training run."""
