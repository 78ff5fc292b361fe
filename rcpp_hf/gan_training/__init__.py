"""Training the GAN layer pruner (`methods/gan_pruner/`): a discriminator that tells unpruned from pruned text hidden
states pushes the pruned model to stay indistinguishable, with the backbone frozen (`train.py`); the matched
controls at the trained budgets (`baselines.py`)."""
