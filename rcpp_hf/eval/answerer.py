"""The one place where evaluation touches the model: loading, the checkpoint's token ids, batched answers.

Prompts follow LLaVA-1.5's own evaluation (`conv_mode vicuna_v1`): the system prompt, then
"USER: <image>\\n{user message} ASSISTANT:". Images are padded to a square with the processor's mean
colour before the processor resizes them, as LLaVA-1.5 does (`image_aspect_ratio: pad`); the
llava-hf processor alone would centre-crop instead ("crop").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, GenerationConfig
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from rcpp_hf.auto import from_pretrained
from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.tiny_families import WithoutVideoProcessor

LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_ASPECTS = ("pad", "crop")
DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(path: str | Path, dtype: str = "auto", device: str | torch.device = "cpu", device_map=None):
    """Load a checkpoint (model + processor) for generation; returns (model, processor).

    The model is its family's rcpp_hf class (`rcpp_hf.from_pretrained`): with a config whose `rcpp` is False it
    decodes exactly as the stock transformers class. `dtype` is "auto" (the checkpoint's), "float32",
    "float16" or "bfloat16". A `device_map` (e.g. "auto", to spread a large model over several GPUs) places the
    weights instead of `device`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if device_map is None:
        model = from_pretrained(path, dtype=DTYPES[dtype]).to(device)
    else:
        model = from_pretrained(path, dtype=DTYPES[dtype], device_map=device_map)
    model = model.eval()
    processor = load_processor(path)
    processor.tokenizer.padding_side = "left"  # decoder-only batches: prompts end where generation starts
    return model, processor


def load_processor(path: str | Path):
    """The checkpoint's processor; for images only (no video processor) where its video processor needs
    torchvision and torchvision is not installed (Qwen-VL, LLaVA-OneVision): prompts and images are the same."""
    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
    processor_class = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(path))]
    image_only = type(f"{processor_class.__name__}WithoutVideo", (WithoutVideoProcessor, processor_class), {})
    tokenizer = AutoTokenizer.from_pretrained(path)
    return image_only(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
                      video_processor=None, chat_template=tokenizer.chat_template)  # fmt: skip


def with_checkpoint_token_ids(config: RCPPGenerationConfig, model_path: str | Path) -> RCPPGenerationConfig:
    """`config` with the checkpoint's special token ids (bos, eos, pad) where it leaves them unset.

    Reads only the checkpoint's small JSON files, so a bad configuration fails before any weights are loaded.
    """
    try:
        checkpoint = GenerationConfig.from_pretrained(model_path)
    except OSError:  # a checkpoint without generation_config.json: generate() derives one from its config
        checkpoint = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_path))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name) is None:
            setattr(config, name, getattr(checkpoint, name))
    return config


def llava_prompt(user_message: str, system_prompt: str, image_token: str = "<image>") -> str:
    """LLaVA-1.5's single-turn conversation with one image."""
    return f"{system_prompt} USER: {image_token}\n{user_message} ASSISTANT:"


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side symmetrically with `fill`, keeping the image centred."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def pad_colour(processor) -> tuple[int, int, int]:
    """The processor's mean colour, LLaVA-1.5's padding of an image to a square."""
    return tuple(int(channel * 255) for channel in processor.image_processor.image_mean)


def eos_ids(generation_config) -> set[int]:
    eos = generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def answer_length(tokens: list[int], eos: set[int]) -> int:
    """Generated tokens up to and including the first end-of-sequence token (after it: padding of a finished row)."""
    return next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))


@dataclass(frozen=True)
class Answer:
    text: str  # decoded, special tokens skipped, stripped
    num_tokens: int  # generated tokens, the end-of-sequence token included


class Answerer:
    """Answers a batch of (image, user message) pairs with one model and one decoding configuration."""

    def __init__(self, model, processor, generation_config: RCPPGenerationConfig, system_prompt: str, image_aspect: str):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        self.model = model
        self.processor = processor
        self.generation_config = generation_config
        self.system_prompt = system_prompt
        self.image_aspect = image_aspect
        self._pad_colour = pad_colour(processor)
        self._eos_ids = eos_ids(generation_config)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], user_messages: list[str]) -> list[Answer]:
        images = [image.convert("RGB") for image in images]
        if self.image_aspect == "pad":
            images = [expand_to_square(image, self._pad_colour) for image in images]
        texts = [llava_prompt(message, self.system_prompt, self.processor.image_token) for message in user_messages]
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        sequences = self.model.generate(**inputs, generation_config=self.generation_config)
        generated = sequences[:, inputs["input_ids"].shape[1] :].tolist()
        answers = []
        for tokens in generated:
            length = answer_length(tokens, self._eos_ids)
            text = self.processor.tokenizer.decode(tokens[:length], skip_special_tokens=True).strip()
            answers.append(Answer(text, length))
        return answers
