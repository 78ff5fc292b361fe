"""Prompts of the ShapesWorld tasks (captions and questions), and the packed training examples built from them.

Evaluation asks one question per conversation, in llava-1.5's single-turn format
"USER: <image>\\n{prompt} ASSISTANT:". Training packs several such single-turn examples about one
image into one sequence, so that the 100 visual tokens are paid for once per image rather than once
per answer: the shared prefix "USER: <image>\\n" comes first, then each example's
"{prompt} ASSISTANT: {answer}</s>". An attention mask keeps the examples apart (each sees the prefix
and itself) and each restarts its positions where the prefix ends, so every example is, token for
token and position for position, the single-turn conversation evaluation runs.

Why not LLaVA's multi-turn conversations ("... ASSISTANT: a1</s>USER: q2 ASSISTANT: ...")? There a
question asked after the caption can be answered by copying from the caption, and a caption after
the questions can copy their kinds: text shortcuts that a model with a randomly initialised vision
tower takes instead of looking (measured: POPE accuracy at chance after 1000 such steps).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from rcpp_hf.shapesworld.captions import reference_caption
from rcpp_hf.shapesworld.questions import (
    colour_pair,
    colour_question,
    count_answer,
    count_of,
    count_pair,
    count_question,
    position_pair,
    question_text,
    sample_questions,
    single_objects,
)
from rcpp_hf.shapesworld.world import Scene

CAPTION_PROMPT = "Please describe this image in detail."  # CHAIR's prompt: the evaluation default
CAPTION_PROMPTS = (CAPTION_PROMPT, "Describe the image.", "What is in the image?")
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA's POPE prompt suffix
IMAGE_PREFIX = "USER: <image>\n"  # llava-1.5's single-turn prompt up to the user's text


def pope_prompt(question: str) -> str:
    return question + POPE_SUFFIX


def llava_prompt(text: str) -> str:
    """llava-1.5's single-turn prompt about one image, as its chat template renders it."""
    return f"{IMAGE_PREFIX}{text} ASSISTANT:"


def chat_prompt(processor, text: str, num_images: int = 1) -> str:
    """The single-turn prompt for `text` about `num_images` images (placed before it), rendered by the processor's
    chat template."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    conversation = [{"role": "user", "content": content}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def training_turns(scene: Scene, num_yes: int = 3, num_no: int = 3, binding_rounds: int = 1) -> list[tuple[str, str]]:
    """(user text, assistant answer) examples about `scene`: one caption request, `num_yes` + `num_no`
    existence questions, and one question of each other kind (see `questions.py`): an open count,
    an open colour, a yes/no count and a yes/no colour (each answered yes or no at random), and
    both questions of a position pair. Each of `binding_rounds - 1` further rounds adds both questions
    of a new colour pair and of a new position pair (the questions that bind an attribute to a kind).

    Deterministic per scene; the caption comes first. Questions carry LLaVA's short-answer suffix
    half of the time, so that both the bare question and the POPE / MME prompt are in distribution.
    """
    rng = scene.rng("turns")
    turns = [(rng.choice(CAPTION_PROMPTS), reference_caption(scene))]
    questions = [(question_text(kind), answer) for kind, answer in sample_questions(scene, rng, num_yes, num_no)]
    counted = rng.choice(sorted(scene.kinds))
    questions.append((count_question(counted), count_answer(count_of(scene, counted))))
    singles = single_objects(scene)
    if singles:
        obj = rng.choice(singles)
        questions.append((colour_question(obj.kind), obj.colour.capitalize()))
    for pair in (count_pair(scene, rng), colour_pair(scene, rng)):
        if pair is not None:
            questions.append(pair[rng.random() < 0.5])
    questions.extend(position_pair(scene, rng) or ())
    for _ in range(binding_rounds - 1):
        questions.extend(colour_pair(scene, rng) or ())
        questions.extend(position_pair(scene, rng) or ())
    turns += [(pope_prompt(question) if rng.random() < 0.5 else question, answer) for question, answer in questions]
    return turns


@dataclass(frozen=True)
class PackedExample:
    """Single-turn examples about one image packed into one sequence (see the module docstring).

    `segments` is 0 on the shared prefix and i on the tokens of example i (from 1); `position_ids`
    restart after the prefix for every example; `labels` are -100 except on the answers and their eos.
    """

    input_ids: list[int]
    labels: list[int]
    segments: list[int]
    position_ids: list[int]


def encode_packed(turns: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, num_image_tokens: int) -> PackedExample:
    """Pack `turns` about one image; the image token is expanded to `num_image_tokens` copies as LlavaProcessor does."""
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    prefix = tokenizer(IMAGE_PREFIX, add_special_tokens=False).input_ids
    prefix = [t for token in prefix for t in ([token] * num_image_tokens if token == image_id else [token])]
    ids, labels, segments, positions = list(prefix), [-100] * len(prefix), [0] * len(prefix), list(range(len(prefix)))
    for segment, (user, answer) in enumerate(turns, start=1):
        prompt = tokenizer(f"{user} ASSISTANT:", add_special_tokens=False).input_ids
        reply = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
        segments += [segment] * (len(prompt) + len(reply))
        positions += range(len(prefix), len(prefix) + len(prompt) + len(reply))
    return PackedExample(ids, labels, segments, positions)
