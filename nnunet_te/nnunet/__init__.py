"""nnU-Net integration: datasets, weights, trainers, data plumbing."""
