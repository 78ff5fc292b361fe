"""The ShapesWorld tokenizer: tiny.py's byte-level BPE, trained on the world's own language.

The corpus holds every prompt, question, answer and a fixed sample of reference captions, and the
vocabulary is large enough for every word of the grammar to become one token (tested), so a caption
costs one token per word and the decoder spends no capacity on spelling.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from rcpp_hf.shapesworld.captions import reference_caption
from rcpp_hf.shapesworld.conversations import CAPTION_PROMPTS, POPE_SUFFIX
from rcpp_hf.shapesworld.questions import NO, YES, question_text
from rcpp_hf.shapesworld.world import KINDS, sample_scene
from rcpp_hf.tiny import build_tokenizer

VOCAB_SIZE = 512  # an upper bound: the BPE runs out of merges at about 450 tokens
_CORPUS_SEED = 10_000  # a seed no split uses, so the tokenizer depends on no evaluation scene
_CORPUS_CAPTIONS = 3000


def tokenizer_corpus() -> list[str]:
    lines = [f"USER: <image>\n{prompt} ASSISTANT:" for prompt in CAPTION_PROMPTS]
    lines += [f"USER: <image>\n{question_text(k)}{POPE_SUFFIX} ASSISTANT: {a}" for k in KINDS for a in (YES, NO)]
    lines += [reference_caption(sample_scene(_CORPUS_SEED, i)) for i in range(_CORPUS_CAPTIONS)]
    return lines


def build_shapesworld_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(VOCAB_SIZE, tokenizer_corpus())
