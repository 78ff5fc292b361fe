"""Prompts of the two ShapesWorld tasks and the multi-turn training conversations built from them.

Evaluation asks one question per conversation, in llava-1.5's single-turn format
"USER: <image>\\n{prompt} ASSISTANT:". Training packs several turns about one image into one
sequence, as LLaVA-1.5's own instruction data does ("... ASSISTANT: a1</s>USER: q2 ASSISTANT: ..."),
so that the 100 visual tokens are paid for once per image rather than once per answer. The turns
are shuffled, so the first turn, the only one evaluation uses, is any of the tasks.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from rcpp_hf.shapesworld.captions import reference_caption
from rcpp_hf.shapesworld.questions import question_text, sample_questions
from rcpp_hf.shapesworld.world import Scene

CAPTION_PROMPT = "Please describe this image in detail."  # CHAIR's prompt: the evaluation default
CAPTION_PROMPTS = (CAPTION_PROMPT, "Describe the image.", "What is in the image?")
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA's POPE prompt suffix


def pope_prompt(question: str) -> str:
    return question + POPE_SUFFIX


def user_turn(text: str, with_image: bool) -> str:
    """One user turn up to the assistant's answer, as llava-1.5's chat template renders it."""
    image = "<image>\n" if with_image else ""
    return f"USER: {image}{text} ASSISTANT:"


def chat_prompt(processor, text: str) -> str:
    """The single-turn prompt for `text` about one image, rendered by the processor's chat template."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def training_turns(scene: Scene, num_yes: int = 2, num_no: int = 2) -> list[tuple[str, str]]:
    """(user text, assistant answer) turns about `scene`: one caption request and its yes/no questions.

    Deterministic per scene. Questions carry LLaVA's POPE suffix half of the time, so that both the
    bare question and the POPE prompt are in distribution.
    """
    rng = scene.rng("turns")
    turns = [(rng.choice(CAPTION_PROMPTS), reference_caption(scene))]
    for kind, answer in sample_questions(scene, rng, num_yes, num_no):
        question = question_text(kind)
        turns.append((pope_prompt(question) if rng.random() < 0.5 else question, answer))
    rng.shuffle(turns)
    return turns


def encode_conversation(
    turns: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, num_image_tokens: int
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation about one image and its labels (-100 except on the answers).

    The image goes with the first turn, expanded to `num_image_tokens` image tokens as
    LlavaProcessor expands it; every answer ends with the eos token, as in LLaVA's training data.
    """
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    ids: list[int] = []
    labels: list[int] = []
    for i, (user, answer) in enumerate(turns):
        prompt = tokenizer(user_turn(user, with_image=i == 0), add_special_tokens=False).input_ids
        prompt = [t for token in prompt for t in ([token] * num_image_tokens if token == image_id else [token])]
        reply = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
    return ids, labels
