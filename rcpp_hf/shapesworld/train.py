"""`rcpp-hf shapesworld train`: train the ShapesWorld LLaVA from scratch on a CPU, reproducibly.

Every batch is a pure function of (world_seed, step): scenes `step * batch_size ...` of the training
world, each rendered and turned into one multi-turn conversation (a caption and yes/no answers,
see `conversations.py`). The initial weights come from `seed`. AdamW with linear warm-up and
cosine decay, float32, gradient clipping. A resumable state is saved every `save_every` steps, so
an interrupted run continues where it stopped and ends with the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rcpp_hf.shapesworld.conversations import encode_conversation, training_turns
from rcpp_hf.shapesworld.model import SHAPESWORLD_SPEC, build_shapesworld_llava
from rcpp_hf.shapesworld.render import render_scene
from rcpp_hf.shapesworld.world import TEST_SEED, TRAIN_SEED, VALIDATION_SEED, sample_scene
from rcpp_hf.tiny import TinyLlavaSpec

STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    """What a training run is; the defaults trained the shipped checkpoint."""

    seed: int = 0  # initial weights
    world_seed: int = TRAIN_SEED  # training scenes; the held-out worlds' seeds are refused
    steps: int = 1600
    batch_size: int = 16
    lr: float = 1.5e-3
    warmup_steps: int = 80
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    save_every: int = 200

    def __post_init__(self):
        if self.world_seed in (VALIDATION_SEED, TEST_SEED):
            raise ValueError(f"world_seed {self.world_seed} is a held-out world (validation {VALIDATION_SEED}, test {TEST_SEED})")
        for name in ("steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0 at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / (config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def training_batch(processor, seed: int, step: int, batch_size: int, num_image_tokens: int) -> dict[str, torch.Tensor]:
    """Batch `step` of the world `seed`: right-padded input_ids, attention_mask, labels, pixel_values."""
    scenes = [sample_scene(seed, step * batch_size + i) for i in range(batch_size)]
    tokenizer = processor.tokenizer
    encoded = [encode_conversation(training_turns(s), tokenizer, num_image_tokens) for s in scenes]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
    labels = torch.full((batch_size, length), -100)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    pixel_values = processor.image_processor([render_scene(s) for s in scenes], return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on norms and biases (1-D parameters), as usual for transformers.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))


def train(
    config: TrainConfig, output_dir: str | Path, spec: TinyLlavaSpec = SHAPESWORLD_SPEC, progress: bool = True
) -> Path:
    """Train, save model + processor into `output_dir`, and return it; resumes a run found there.

    `spec` sets the model's shapes (tests train a much smaller one).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model, processor = build_shapesworld_llava(spec, seed=config.seed)
    model.train()
    optimizer = _optimizer(model, config)
    start, elapsed, losses = 0, 0.0, []
    state_path = output_dir / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"{state_path} was saved by a run with another config: {state['config']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed, losses = state["step"], state["elapsed_s"], state["losses"]

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train", disable=not progress)
    began = time.perf_counter() - elapsed
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        batch = training_batch(processor, config.world_seed, step, config.batch_size, spec.num_visual_tokens)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        done = step + 1
        if done % config.save_every == 0 and done < config.steps:
            state = {"config": asdict(config), "step": done, "elapsed_s": time.perf_counter() - began,
                     "losses": losses, "model": model.state_dict(), "optimizer": optimizer.state_dict()}  # fmt: skip
            torch.save(state, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)  # never a half-written state

    model.eval()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    summary = {
        "config": asdict(config),
        "train_seconds": round(time.perf_counter() - began, 1),
        "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "torch_threads": torch.get_num_threads(),
        "losses": losses,
    }
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    state_path.unlink(missing_ok=True)
    return output_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the ShapesWorld LLaVA on CPU", description=__doc__)
    defaults = TrainConfig()
    parser.add_argument("--output-dir", required=True, help="where the checkpoint (and resumable state) go")
    for name, kind in (("seed", int), ("world_seed", int), ("steps", int), ("batch_size", int), ("lr", float), ("warmup_steps", int),
                       ("weight_decay", float), ("max_grad_norm", float), ("save_every", int)):  # fmt: skip
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    fields = TrainConfig.__dataclass_fields__
    config = TrainConfig(**{name: getattr(args, name) for name in fields})
    folder = train(config, args.output_dir)
    print(f"saved {folder}")
    return 0
