"""The GAN-trained layer pruner (issue 16, the gan-layer-pruner seed): small pruners before three decoder layers
decide per visual token from its hidden state and the question; a discriminator that tells unpruned from pruned text
hidden states pushes the pruned model to stay indistinguishable. Trained with the backbone frozen (`train.py`),
evaluated as the registry method "gan_pruner" (`method.py`)."""
