"""The GAN-trained layer pruner at inference: small pruners before three decoder layers decide per visual token from
its hidden state and the question (`pruner.py`, with the optional token merger `merger.py` and attention residual
`attention_residual.py`), evaluated as the registry method "gan_pruner" (`method.py`). They are trained against a
discriminator with the backbone frozen by `rcpp_hf/gan_training/`."""

from rcpp_hf.methods.gan_pruner.method import GanPruner

__all__ = ["GanPruner"]
