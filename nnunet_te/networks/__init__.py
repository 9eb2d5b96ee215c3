"""Networks: nnU-Net's architectures built from plans, pre-trained weights loaded into them, and
the stages hooked for features."""
