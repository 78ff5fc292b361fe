"""The ShapesWorld tokenizer: tiny.py's byte-level BPE, trained on the world's own language.

The corpus holds every prompt, question, answer and a fixed sample of reference captions, and the
vocabulary is large enough for every word of the grammar to become one token (tested), so a caption
costs one token per word and the decoder spends no capacity on spelling.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from rcpp_hf.shapesworld.captions import reference_caption
from rcpp_hf.shapesworld.conversations import CAPTION_PROMPTS, POPE_SUFFIX
from rcpp_hf.shapesworld.questions import (
    COLUMN_NAMES,
    NO,
    NUMBER_WORDS,
    RELATIONS,
    ROW_NAMES,
    YES,
    colour_claim,
    colour_question,
    count_answer,
    count_claim,
    count_question,
    column_claim,
    question_text,
    relation_claim,
    row_claim,
)
from rcpp_hf.shapesworld.world import COLOURS, KINDS, sample_scene
from rcpp_hf.tiny import build_tokenizer

VOCAB_SIZE = 512  # an upper bound: the BPE runs out of merges at about 450 tokens
_CORPUS_SEED = 10_000  # a seed no split uses, so the tokenizer depends on no evaluation scene
_CORPUS_CAPTIONS = 3000


def tokenizer_corpus() -> list[str]:
    lines = [f"USER: <image>\n{prompt} ASSISTANT:" for prompt in CAPTION_PROMPTS]
    questions = [question_text(k) for k in KINDS] + [count_question(k) for k in KINDS] + [colour_question(k) for k in KINDS]
    questions += [count_claim(k, n) for k in KINDS for n in range(1, len(NUMBER_WORDS) + 1)]
    questions += [colour_claim(k, c) for k in KINDS for c in COLOURS]
    questions += [relation_claim(a, r, b) for a in KINDS for r in RELATIONS for b in KINDS if a != b]
    questions += [row_claim(k, i) for k in KINDS for i in range(len(ROW_NAMES))]
    questions += [column_claim(k, i) for k in KINDS for i in range(len(COLUMN_NAMES))]
    answers = [YES, NO] + [count_answer(n) for n in range(1, len(NUMBER_WORDS) + 1)] + [c.capitalize() for c in COLOURS]
    lines += [f"USER: <image>\n{q}{POPE_SUFFIX} ASSISTANT: {a}" for q in questions for a in answers]
    lines += [reference_caption(sample_scene(_CORPUS_SEED, i)) for i in range(_CORPUS_CAPTIONS)]
    return lines


def build_shapesworld_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(VOCAB_SIZE, tokenizer_corpus())
