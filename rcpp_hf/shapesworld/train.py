"""`rcpp-hf shapesworld train`: train the ShapesWorld LLaVA from scratch on a CPU, reproducibly.

Every batch is a pure function of (world_seed, step): scenes `step * batch_size ...` of the training
world, each rendered and turned into one packed sequence of single-turn examples (a caption and
existence, count, colour and position questions, see `conversations.py`). The initial weights come from `seed`. AdamW with linear warm-up and
cosine decay, float32, gradient clipping. A resumable state is saved every `save_every` steps, so
an interrupted run continues where it stopped and ends with the same weights.

The language loss weights tokens: a question's answer tokens (the answer and its eos) count
`answer_loss_weight` (4) times a caption token, because a plain token mean let the ~25 tokens of
a caption outweigh the 2 of a yes/no answer twelvefold and left POPE accuracy at 0.838 on the test
world after 1800 steps of the 4-layer model, with captions already good.

The vision tower gets one more signal. LLaVA starts from a pretrained CLIP whose patch tokens already
mean something; ours starts from random weights, and the language loss alone leaves the model on a
plateau where it describes the language prior and ignores the image (measured: no image use after
300 steps, even on one-object scenes). A linear probe on the vision tower's patch tokens, trained
to name the kind and colour of the object under each patch (`patch_targets`, from the renderer's
pixel-exact object map), stands in for that pretraining. The probe is discarded: the checkpoint is a
plain LlavaForConditionalGeneration.
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
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from rcpp_hf.shapesworld.conversations import encode_packed, training_turns
from rcpp_hf.shapesworld.expand import expand_decoder
from rcpp_hf.shapesworld.model import SHAPESWORLD_SPEC, build_shapesworld_llava
from rcpp_hf.shapesworld.render import render_object_map, render_scene
from rcpp_hf.shapesworld.world import COLOURS, KINDS, TEST_SEED, TRAIN_SEED, VALIDATION_SEED, Scene, WorldConfig, sample_scene
from rcpp_hf.tiny import TinyLlavaSpec

STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    """What a training run is; the defaults train the 12-layer model of `model.py` (ShapesWorld v2)."""

    seed: int = 0  # initial weights
    world_seed: int = TRAIN_SEED  # training scenes; the held-out worlds' seeds are refused
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1.5e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    patch_loss_weight: float = 1.0  # weight of the vision tower's patch-probe loss (0: language loss only)
    answer_loss_weight: float = 4.0  # weight of a question's answer tokens against a caption's (1 each)
    save_every: int = 100
    init_from: str | None = None  # a trained, shallower ShapesWorld checkpoint to deepen (`expand.py`) instead of `seed`'s weights
    freeze_vision: bool = False  # keep the vision tower as initialised (no gradient, no patch probe)
    binding_rounds: int = 1  # rounds of colour and position questions per scene (`conversations.training_turns`)

    def __post_init__(self):
        if self.world_seed in (VALIDATION_SEED, TEST_SEED):
            raise ValueError(f"world_seed {self.world_seed} is a held-out world (validation {VALIDATION_SEED}, test {TEST_SEED})")
        for name in ("steps", "batch_size", "save_every", "binding_rounds"):
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
        for name in ("patch_loss_weight", "answer_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.freeze_vision and self.patch_loss_weight:
            raise ValueError("a frozen vision tower learns nothing from the patch probe: set patch_loss_weight to 0")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0 at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / (config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def batch_scenes(world_seed: int, step: int, batch_size: int) -> list[Scene]:
    """The scenes of batch `step`: indices `step * batch_size ...` of the training world."""
    return [sample_scene(world_seed, step * batch_size + i) for i in range(batch_size)]


def training_batch(
    processor,
    scenes: list[Scene],
    num_image_tokens: int,
    answer_loss_weight: float = 1.0,
    turns: list[list[tuple[str, str]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs of one packed example per scene (`conversations.encode_packed`), right-padded,
    and `loss_weights` (B, L): each labelled token's weight, 1 on the caption (the first example),
    `answer_loss_weight` on the questions' answers.

    `turns`: the examples of each scene (default `training_turns(scene)`, the caption first); the
    GAN pruner's trainer passes one question per scene.

    attention_mask is 4-D and boolean, (B, 1, L, L): a token sees the earlier tokens of the shared
    prefix and of its own example; padding sees the prefix only and carries no label.
    """
    tokenizer = processor.tokenizer
    turns = [training_turns(s) for s in scenes] if turns is None else turns
    packed = [encode_packed(t, tokenizer, num_image_tokens) for t in turns]
    length = max(len(p.input_ids) for p in packed)
    input_ids = torch.full((len(scenes), length), tokenizer.pad_token_id)
    labels = torch.full((len(scenes), length), -100)
    loss_weights = torch.zeros((len(scenes), length))
    segments = torch.full((len(scenes), length), -1)
    position_ids = torch.zeros((len(scenes), length), dtype=torch.long)
    for row, (p, row_turns) in enumerate(zip(packed, turns)):
        n = len(p.input_ids)
        input_ids[row, :n], labels[row, :n] = torch.tensor(p.input_ids), torch.tensor(p.labels)
        segments[row, :n], position_ids[row, :n] = torch.tensor(p.segments), torch.tensor(p.position_ids)
        weight_of_segment = torch.tensor([0.0, 1.0] + [answer_loss_weight] * (len(row_turns) - 1))
        loss_weights[row, :n] = torch.where(labels[row, :n] != -100, weight_of_segment[segments[row, :n]], 0.0)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_example = segments[:, :, None] == segments[:, None, :]
    visible = (segments[:, None, :] == 0) | (same_example & (segments[:, :, None] > 0))
    attention_mask = (visible & causal)[:, None]
    pixel_values = processor.image_processor([render_scene(s) for s in scenes], return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "labels": labels, "loss_weights": loss_weights, "pixel_values": pixel_values}  # fmt: skip


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * CE) / sum(w): logits (N, V); targets (N,), -100 ignored; weights (N,)."""
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
    return (ce * weights).sum() / weights.sum()


def language_loss(logits: torch.Tensor, labels: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, each labelled token weighted: sum(w * CE) / sum(w). logits (B, L, V); labels, weights (B, L)."""
    return weighted_cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), loss_weights[:, 1:].flatten())


def patch_targets(scenes: list[Scene], patches_per_side: int, config: WorldConfig = WorldConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """What each patch shows, row-major like the vision tower's patch tokens: (B, P) each.

    kind: 0 for background, 1 + index in `KINDS` for the object covering most of the patch, when it
    covers at least 1/8 of it; colour: index in `COLOURS` of that object, -100 (ignored) on background.
    """
    block = config.image_size // patches_per_side
    if block * patches_per_side != config.image_size:
        raise ValueError(f"{patches_per_side} patches per side do not tile {config.image_size} px images")
    kind_index = {k: i for i, k in enumerate(KINDS)}
    colour_index = {c: i for i, c in enumerate(COLOURS)}
    kinds, colours = [], []
    for scene in scenes:
        pixels = bytearray(render_object_map(scene, config).tobytes())
        object_map = torch.frombuffer(pixels, dtype=torch.uint8).long().view(config.image_size, config.image_size)
        one_hot = torch.nn.functional.one_hot(object_map, len(scene.objects) + 1)  # (H, W, 1 + objects)
        counts = one_hot.view(patches_per_side, block, patches_per_side, block, -1).sum((1, 3)).flatten(0, 1)  # (P, 1 + objects)
        best_count, best = counts[:, 1:].max(dim=1)
        covered = best_count >= block * block / 8
        kind_of = torch.tensor([1 + kind_index[o.kind] for o in scene.objects])
        colour_of = torch.tensor([colour_index[o.colour] for o in scene.objects])
        kinds.append(torch.where(covered, kind_of[best], 0))
        colours.append(torch.where(covered, colour_of[best], -100))
    return torch.stack(kinds), torch.stack(colours)


class PatchProbe(torch.nn.Module):
    """Linear heads naming the kind (or background) and colour under each vision patch token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.kind = torch.nn.Linear(hidden_size, len(KINDS) + 1)
        self.colour = torch.nn.Linear(hidden_size, len(COLOURS))

    def loss(self, patch_tokens: torch.Tensor, kinds: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
        """patch_tokens (B, P, D); kinds, colours (B, P) from `patch_targets`."""
        ce = torch.nn.functional.cross_entropy
        return ce(self.kind(patch_tokens).flatten(0, 1), kinds.flatten()) + ce(
            self.colour(patch_tokens).flatten(0, 1), colours.flatten(), ignore_index=-100
        )


class _VisionFeatures:
    """Keeps the vision tower's output at the layer LLaVA feeds the projector (CLS dropped) during a forward."""

    def __init__(self, model):
        self.layer = model.config.vision_feature_layer
        self.tokens = None
        model.model.vision_tower.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.tokens = output.hidden_states[self.layer][:, 1:]


def _load_source(folder: str) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The checkpoint (model, processor) that `init_from` names."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"init_from: no checkpoint (config.json) in {path}")
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32), LlavaProcessor.from_pretrained(path)


def _optimizer(parameters: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on norms and biases (1-D parameters), as usual for transformers.
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
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
    if config.init_from is not None:
        source, source_processor = _load_source(config.init_from)
        expand_decoder(source, model, source_processor.tokenizer.get_vocab(), processor.tokenizer.get_vocab())
    probe = PatchProbe(spec.vision_hidden)
    model.train()
    if config.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    trained = [p for p in [*model.parameters(), *probe.parameters()] if p.requires_grad]
    optimizer = _optimizer(trained, config)
    start, elapsed, cpu_elapsed, losses = 0, 0.0, 0.0, []
    state_path = output_dir / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"{state_path} was saved by a run with another config: {state['config']}")
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed, cpu_elapsed, losses = state["step"], state["elapsed_s"], state["cpu_s"], state["losses"]

    vision = _VisionFeatures(model)
    patches_per_side = spec.image_size // spec.patch_size
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train", disable=not progress)
    began, cpu_began = time.perf_counter() - elapsed, time.process_time() - cpu_elapsed
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        scenes = batch_scenes(config.world_seed, step, config.batch_size)
        turns = [training_turns(scene, binding_rounds=config.binding_rounds) for scene in scenes]
        batch = training_batch(processor, scenes, spec.num_visual_tokens, config.answer_loss_weight, turns=turns)
        labels, loss_weights = batch.pop("labels"), batch.pop("loss_weights")
        text_loss = language_loss(model(**batch).logits, labels, loss_weights)
        if config.patch_loss_weight:
            patch_loss = probe.loss(vision.tokens, *patch_targets(scenes, patches_per_side))
        else:
            patch_loss = torch.zeros(())
        (text_loss + config.patch_loss_weight * patch_loss).backward()
        torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append([round(text_loss.item(), 5), round(patch_loss.item(), 5)])
        recent = losses[-20:]
        bar.set_postfix(language=f"{sum(l for l, _ in recent) / len(recent):.4f}", patch=f"{sum(p for _, p in recent) / len(recent):.4f}")
        done = step + 1
        if done % config.save_every == 0 and done < config.steps:
            state = {"config": asdict(config), "step": done, "elapsed_s": time.perf_counter() - began,
                     "cpu_s": time.process_time() - cpu_began, "losses": losses, "model": model.state_dict(),
                     "probe": probe.state_dict(), "optimizer": optimizer.state_dict()}  # fmt: skip
            torch.save(state, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)  # never a half-written state

    model.eval()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    last = losses[-50:]
    summary = {
        "config": asdict(config),
        "train_seconds": round(time.perf_counter() - began, 1),  # wall clock, resumed runs included
        "cpu_seconds": round(time.process_time() - cpu_began, 1),  # all threads of this process
        "language_loss_last_50": sum(l for l, _ in last) / len(last),
        "patch_loss_last_50": sum(p for _, p in last) / len(last),
        "torch_threads": torch.get_num_threads(),
        "losses": losses,  # [language, patch] per step
    }
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    state_path.unlink(missing_ok=True)
    return output_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the ShapesWorld LLaVA on CPU", description=__doc__)
    defaults = TrainConfig()
    parser.add_argument("--output-dir", required=True, help="where the checkpoint (and resumable state) go")
    for name, kind in (("seed", int), ("world_seed", int), ("steps", int), ("batch_size", int), ("lr", float), ("warmup_steps", int),
                       ("weight_decay", float), ("max_grad_norm", float), ("patch_loss_weight", float),
                       ("answer_loss_weight", float),
                       ("save_every", int), ("init_from", str), ("binding_rounds", int)):  # fmt: skip
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    parser.add_argument("--freeze-vision", action="store_true", help="train without touching the vision tower")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    fields = TrainConfig.__dataclass_fields__
    config = TrainConfig(**{name: getattr(args, name) for name in fields})
    folder = train(config, args.output_dir)
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    print(f"saved {folder}: {summary['train_seconds'] / 60:.1f} min wall, {summary['cpu_seconds'] / 60:.1f} min CPU, "
          f"language loss {summary['language_loss_last_50']:.4f}, patch loss {summary['patch_loss_last_50']:.4f}")
    return 0
