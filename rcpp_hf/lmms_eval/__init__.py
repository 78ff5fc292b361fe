"""rcpp_hf as an lmms-eval model (EvolvingLMMs-Lab/lmms-eval): `lmms-eval --model rcpp_hf --model_args ...`.

`model.py` is the model (`RCPPLmms`), `manifest.py` the registration lmms-eval finds through the `lmms_eval.models`
entry point. Both import lmms-eval, which `pip install -e ".[lmms]"` installs; `import rcpp_hf` does not need it.
"""
