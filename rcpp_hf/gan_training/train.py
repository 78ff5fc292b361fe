"""`rcpp-hf gan-pruner train`: train the layer pruners against a discriminator, the LLaVA backbone frozen.

Each step: the unpruned forward (real, no gradient) and the pruned forward (fake: Gumbel masks from the pruners,
applied as an attention policy, `forward.py`) over one ShapesWorld question per scene; a generator step on the
pruners (task CE + adversarial + sparsity + token count + binarisation, weights on cosine schedules) with the
discriminator frozen; a discriminator step on real vs detached fake. Every random draw (scenes, questions, Gumbel and
discriminator noise) is a function of (seed, step), and a resumable state is saved every `save_every` steps, so an
interrupted run continues to the same weights.

Training data is the ShapesWorld training world (`shapesworld/train.py`'s `training_batch`), one single-turn example
per row (a question or a caption request drawn per scene): the pruners' masks depend on the question, so the packed
examples of the backbone's own training, which share one image prefix between questions, cannot carry them.

Runs under accelerate (plain python, or several processes: `accelerate launch --multi_gpu --num_processes N -m
rcpp_hf.cli gan-pruner train ...`, or `torchrun --nproc_per_node N -m rcpp_hf.cli ...`; without CUDA they run on CPU
over gloo, checked with 2; `accelerate launch --cpu --num_processes N` starts a single process): each process takes
every n-th row of the step's batch, and the gradients are averaged across processes before each optimizer step (no
DDP wrapper: the pruners are called stage by stage inside the backbone's forward).
Curves go to `curves.jsonl` (one line per step) and `curves.png`; the pruners to `save_pretrained` files.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import LlavaProcessor

from rcpp_hf.engine.layout import first_true_columns
from rcpp_hf.engine.pruning import NOT_THE_MODELS_HEADS, REFERENCE_LAYERS, SCALED_LAYERS, scale_layers
from rcpp_hf.engine.vision import gather_tokens
from rcpp_hf.gan_training.discriminator import Discriminator, pool_states
from rcpp_hf.gan_training.forward import PrunedForward, pruned_forward
from rcpp_hf.gan_training.losses import (
    adversarial_loss,
    binarisation_loss,
    budget_loss,
    discriminator_loss,
    distillation_loss,
    dual_ascent,
    sparsity_loss,
    token_count_loss,
)
from rcpp_hf.gan_training.schedules import cosine_schedule
from rcpp_hf.families.llava import llava_shape
from rcpp_hf.methods.budget import budget_argument, budget_problem, budget_rule, describe_budget, is_fraction
from rcpp_hf.methods.gan_pruner.config import GUMBEL_MODES, GanPrunerConfig
from rcpp_hf.methods.gan_pruner.pruner import GanLayerPruners, evaluation_keep_mask, gumbel_keep_mask
from rcpp_hf.methods.pdrop import ratio_for_budget
from rcpp_hf.modeling import RCPPLlavaForConditionalGeneration
from rcpp_hf.shapesworld.conversations import training_turns
from rcpp_hf.shapesworld.train import batch_scenes, language_loss, training_batch
from rcpp_hf.shapesworld.world import TEST_SEED, TRAIN_SEED, VALIDATION_SEED, Scene

STATE_FILE = "trainer_state.pt"
CURVES_FILE = "curves.jsonl"
SUMMARY_FILE = "training.json"
LOSS_TERMS = ("task", "adversarial", "distillation", "sparsity", "token_count", "binarisation")
VARIABLE_LENGTH = ("pruning_layers", "discriminator_layers", "target_keep")  # list settings that are not pairs
OPTIONAL_TYPES = {"target_keep": float, "budget": budget_argument}  # settings whose default is None
SEED_TARGET_KEEP = (0.5, 0.3, 0.15)
# The layer and head flags' help: the rule each follows (the layers are the reference code's, stated for 32 layers).
FLAG_HELP = {
    "pruning_layers": f"before which decoder layers the pruners act: {SCALED_LAYERS} (L layers), round(l * L / 32) "
                      "kept in [1, L - 1], then pushed apart to stay increasing (6 12 18 -> 2 4 7 on 12 layers); training.json "
                      "records the layers used (default: 6 12 18)",
    "discriminator_layers": f"decoder layers whose output text states the discriminator reads: {SCALED_LAYERS} (L "
                            "layers) by their outputs, round((l + 1) * L / 32) - 1, so that 31 stays the last layer, duplicates "
                            "merged (15 23 31 -> 5 8 11 on 12 layers); training.json records the layers used "
                            "(default: 15 23 31)",
    "pruner_heads": f"heads of each pruner's own cross-attention, {NOT_THE_MODELS_HEADS} (--pruner-hidden must be a "
                    "multiple of it; default: 4)",
}  # fmt: skip
UNDECIDED = (0.1, 0.9)  # a relaxed mask in this open interval has not decided yet


@dataclass(frozen=True)
class GanTrainConfig:
    """A training run. Layers are stated for a 32-layer decoder and scaled to the backbone's depth (`FLAG_HELP` says
    how, for each); (start, end) pairs are cosine schedules over the run.

    pruning_layers: before which layers the pruners act (6 / 12 / 18 of 32, as in
        zjw131f1fc/domain-adaptation-token-pruning's `docs/model_summary.md`).
    discriminator_layers: decoder layers whose output text states the discriminator reads.
    target_keep: per stage, the cumulative share of the image's visual tokens kept from its layer on; None: from
        `budget`, or (0.5, 0.3, 0.15) without one.
    budget: the registry's budget instead (visual tokens per decoder layer on average; a count of the backbone's image
        or a fraction of it, `methods/budget.py`, e.g. 128 / 576): the targets are PyramidDrop's lambda, lambda^2,
        lambda^3 with lambda solved for its share of the image at the scaled pruning layers
        (`methods/pdrop.ratio_for_budget`; a fraction is used as it is, a count c as c / V), so that the rows of the
        comparison are at one budget convention.
    budget_lr, budget_bound: step size and bound of the budget multipliers (one per stage, dual ascent on the relative
        error clipped to [-1, 1], the multipliers kept in [-bound, bound]: `losses.dual_ascent`; budget_lr 0: off). The
        reference repository's squared sparsity term acts on training's noisy masks and is outweighed by the task and
        adversarial terms near its target: the first runs ended 0.1-0.5 away from their targets, with evaluation counts
        unrelated to the budget. A multiplier grows while the evaluation's masks (logit > 0, no noise) keep more than
        the target and shrinks while they keep less, and multiplies their keep ratio in the loss (a Lagrangian
        relaxation of "keep ratio = target"). On the 12-layer model it holds the counts while training's masks are
        noisy, not after the noise has annealed (the README's GAN section).
    gumbel_noise: factor on the Gumbel (logistic) noise of the masks, (start, end). The reference repository anneals
        only the temperature, which leaves straight-through masks' forward unchanged (logit + noise > 0 at any
        temperature); with the noise constant, a run on the 12-layer ShapesWorld model (budget 128) learned logits near
        0 for most tokens and let the noise drop them: 0.55 kept at its last stage in training, 0.86 at evaluation
        (logit > 0). Annealed to 0, the end of training sees the evaluation's masks.
    distillation_weight: KL of the unpruned model's next-token distribution to the pruned one's, off by default; the
        ablation "without the adversarial term" sets `adversarial_weight` to (0, 0) and this instead (the
        discriminator still trains and is still logged: it measures what the ablation leaves distinguishable).
    attention_residual, token_merger: the pruners' optional parts, off by default (`GanPrunerConfig`).
    """

    seed: int = 0
    world_seed: int = TRAIN_SEED
    steps: int = 600
    batch_size: int = 8
    pruning_layers: tuple[int, ...] = (6, 12, 18)
    discriminator_layers: tuple[int, ...] = (15, 23, 31)
    target_keep: tuple[float, ...] | None = None
    budget: int | float | None = None
    pruner_hidden: int = 512
    pruner_heads: int = 4
    gumbel: str = "straight_through"
    attention_residual: bool = False
    token_merger: int = 0
    discriminator_width: int = 256
    spectral_norm: bool = True
    lr: float = 3e-4
    discriminator_lr: float = 1e-4
    max_grad_norm: float = 1.0
    temperature: tuple[float, float] = (0.99, 0.4)
    gumbel_noise: tuple[float, float] = (1.0, 0.0)
    task_weight: tuple[float, float] = (10.0, 10.0)
    adversarial_weight: tuple[float, float] = (1.0, 10.0)
    distillation_weight: tuple[float, float] = (0.0, 0.0)
    sparsity_weight: tuple[float, float] = (20.0, 20.0)
    token_count_weight: tuple[float, float] = (0.1, 0.1)
    binarisation_weight: tuple[float, float] = (0.0, 1.0)
    noise_scale: tuple[float, float] = (0.05, 0.01)
    pool_weight: tuple[float, float] = (0.3, 1.0)
    budget_lr: float = 0.2
    budget_bound: float = 10.0
    save_every: int = 50

    def __post_init__(self):
        for name, value in asdict(self).items():  # JSON / argparse give lists: keep the config hashable and comparable
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.world_seed in (VALIDATION_SEED, TEST_SEED):
            raise ValueError(f"world_seed {self.world_seed} is a held-out world (validation {VALIDATION_SEED}, test {TEST_SEED})")
        for name in ("steps", "batch_size", "save_every", "pruner_hidden", "pruner_heads", "discriminator_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.token_merger < 0:
            raise ValueError(f"token_merger must be >= 0 (0: no merger), got {self.token_merger}")
        for name in ("lr", "discriminator_lr", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.target_keep is not None and self.budget is not None:
            raise ValueError("give target_keep or budget, not both")
        if self.budget is not None and (problem := budget_problem(self.budget)) is not None:
            raise ValueError(f"budget must be {budget_rule()}; it {problem}, got {self.budget!r}")
        if self.target_keep is not None:
            if len(self.target_keep) != len(self.pruning_layers):
                raise ValueError(f"target_keep needs one value per pruning layer ({len(self.pruning_layers)}), got {self.target_keep}")
            if not all(0 < t <= 1 for t in self.target_keep) or list(self.target_keep) != sorted(self.target_keep, reverse=True):
                raise ValueError(f"target_keep must lie in (0, 1] and not increase, got {self.target_keep}")
        if self.budget_lr < 0 or self.budget_bound <= 0:
            raise ValueError(f"budget_lr must be >= 0 and budget_bound > 0, got {self.budget_lr}, {self.budget_bound}")
        if not self.discriminator_layers:
            raise ValueError("discriminator_layers must name at least one layer")
        if self.gumbel not in GUMBEL_MODES:
            raise ValueError(f"gumbel must be one of {GUMBEL_MODES}, got {self.gumbel!r}")
        for name in ("temperature", "gumbel_noise", *(f"{term}_weight" for term in LOSS_TERMS), "noise_scale", "pool_weight"):
            pair = getattr(self, name)
            if len(pair) != 2 or min(pair) < 0:
                raise ValueError(f"{name} must be a (start, end) pair of non-negative numbers, got {pair}")
        if min(self.temperature) <= 0:
            raise ValueError(f"temperature must stay > 0, got {self.temperature}")


def keep_targets(config: GanTrainConfig, stage_layers: tuple[int, ...], num_layers: int,
                 num_visual: int) -> tuple[float, ...]:  # fmt: skip
    """Per stage, the cumulative keep ratio to train toward on a decoder of `num_layers` whose pruning layers are
    `stage_layers` (scaled), for an image of `num_visual` tokens: `config.target_keep`, or solved for
    `config.budget`. A budget larger than the image or unreachable (below what the layers before the first stage
    already spend) raises ValueError."""
    if config.target_keep is not None:
        return config.target_keep
    if config.budget is None:
        return SEED_TARGET_KEEP
    if not is_fraction(config.budget) and config.budget > num_visual:
        raise ValueError(f"budget {config.budget} is larger than the image's {num_visual} visual tokens")
    fraction = config.budget if is_fraction(config.budget) else config.budget / num_visual
    if fraction <= stage_layers[0] / num_layers:
        raise ValueError(
            f"budget {describe_budget(config.budget, num_visual)} is unreachable with pruning layers {stage_layers} "
            f"of {num_layers}: the {stage_layers[0]} unpruned layers before the first stage alone average "
            f"{num_visual * stage_layers[0] / num_layers:g}; reachable: {num_visual * stage_layers[0] // num_layers + 1}"
            f"..{num_visual}; prune earlier (--pruning-layers)"
        )
    ratio = ratio_for_budget(fraction, stage_layers, num_layers)
    return tuple(ratio ** (s + 1) for s in range(len(stage_layers)))


def scale_state_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Decoder layers whose outputs are read, stated for 32 layers, at the same depth fraction counted in layer
    outputs (output l of 32 -> round((l + 1) * L / 32) - 1, so the last layer stays the last), duplicates merged."""
    return tuple(sorted({min(max(round((l + 1) * num_layers / REFERENCE_LAYERS) - 1, 0), num_layers - 1) for l in layers}))


def gan_batch(processor, scenes: list[Scene], num_image_tokens: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """`training_batch` with one example per scene (drawn from its `training_turns` by the scene's own random
    stream), plus question_mask (B, L): the prompt's text after the image, and text_mask (B, L): all text after the
    image (question and answer), both without padding."""
    turns = [[scene.rng("gan_pruner").choice(training_turns(scene))] for scene in scenes]
    batch = training_batch(processor, scenes, num_image_tokens, turns=turns)
    input_ids = batch["input_ids"]
    index = torch.arange(input_ids.shape[1])
    last_visual = torch.where(input_ids == image_token_id, index, -1).max(dim=1, keepdim=True).values
    batch["text_mask"] = (index > last_visual) & (input_ids != processor.tokenizer.pad_token_id)
    batch["question_mask"] = batch["text_mask"] & (batch["labels"] == -100)
    return batch


def pooled_text_states(
    forward: PrunedForward, text_mask: torch.Tensor, layers: tuple[int, ...], generator, config: GanTrainConfig
) -> list[torch.Tensor]:
    """The discriminator's input: per layer, the text states after the image pooled with noise, (B, D) each.
    Real and fake both come through here."""
    slots = first_true_columns(text_mask, int(text_mask.sum(1).max()))
    valid = text_mask.gather(1, slots)
    return [
        pool_states(gather_tokens(forward.layer_states[layer], slots), valid, generator, config.noise_scale, config.pool_weight)
        for layer in layers
    ]


def loss_weights(config: GanTrainConfig, step: int) -> dict[str, float]:
    return {term: cosine_schedule(*getattr(config, f"{term}_weight"), step, config.steps) for term in LOSS_TERMS}


def loss_terms(
    real: PrunedForward,
    fake: PrunedForward,
    fake_pooled: list[torch.Tensor],
    batch: dict,
    discriminator: Discriminator,
    targets: tuple[float, ...],
) -> dict[str, torch.Tensor]:
    """The generator's loss terms, unweighted; the discriminator is read, not trained: its parameters get no
    gradient, and in eval mode its spectral norms' power iteration does not advance."""
    discriminator.requires_grad_(False).eval()
    try:
        adversarial = adversarial_loss(discriminator(fake_pooled))
    finally:
        discriminator.requires_grad_(True).train()
    return {
        "task": language_loss(fake.logits, batch["labels"], batch["loss_weights"]),
        "adversarial": adversarial,
        "distillation": distillation_loss(fake.logits, real.logits, batch["labels"], batch["loss_weights"]),
        "sparsity": sparsity_loss(fake.keep, targets),
        "token_count": token_count_loss(fake.keep),
        "binarisation": binarisation_loss(fake.samples),
    }


def average_gradients(accelerator: Accelerator, parameters: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over the processes (a no-op in one process)."""
    if accelerator.num_processes > 1:
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")


def optimizer_step(accelerator, optimizer: torch.optim.Optimizer, loss: torch.Tensor, config: GanTrainConfig) -> None:
    """zero_grad, backward, cross-process mean, clipping, step: on the optimizer's parameters only."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(accelerator, parameters)
    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class GanTrainer:
    """The frozen backbone, the trained modules and their optimizers; `step` runs one training step."""

    config: GanTrainConfig
    model: RCPPLlavaForConditionalGeneration
    processor: LlavaProcessor
    pruners: GanLayerPruners
    discriminator: Discriminator
    pruner_optimizer: torch.optim.Optimizer
    discriminator_optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    targets: tuple[float, ...]  # per stage, the cumulative keep ratio trained toward (`keep_targets`)
    multipliers: torch.Tensor  # (S,) the budget multipliers, 0 at the start

    @classmethod
    def build(cls, config: GanTrainConfig, model_dir: str | Path, accelerator: Accelerator | None = None) -> "GanTrainer":
        # cpu=True without CUDA: only then does accelerate take a torchrun-launched group of CPU processes as one
        # distributed run (MULTI_CPU, gloo) rather than independent single processes.
        accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        model = RCPPLlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        model = model.eval().requires_grad_(False).to(accelerator.device)
        processor = LlavaProcessor.from_pretrained(model_dir)
        text = model.config.text_config
        torch.manual_seed(config.seed)
        stage_layers = scale_layers(config.pruning_layers, text.num_hidden_layers)
        targets = keep_targets(config, stage_layers, text.num_hidden_layers, llava_shape(model.config)[1])
        pruners = GanLayerPruners(GanPrunerConfig(
            hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers, pruning_layers=stage_layers,
            pruner_hidden=config.pruner_hidden, pruner_heads=config.pruner_heads, gumbel=config.gumbel,
            attention_residual=config.attention_residual, token_merger=config.token_merger, target_keep=targets,
        )).to(accelerator.device).train()  # fmt: skip
        layers = scale_state_layers(config.discriminator_layers, text.num_hidden_layers)
        discriminator = Discriminator(text.hidden_size, len(layers), config.discriminator_width, config.spectral_norm)
        discriminator = discriminator.to(accelerator.device).train()
        return cls(
            config, model, processor, pruners, discriminator,
            torch.optim.AdamW(pruners.parameters(), lr=config.lr, betas=(0.5, 0.999)),
            torch.optim.AdamW(discriminator.parameters(), lr=config.discriminator_lr, betas=(0.5, 0.999)),
            accelerator, targets, torch.zeros(len(stage_layers), device=accelerator.device),
        )  # fmt: skip

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return tuple(self.pruners.config.pruning_layers)

    @property
    def state_layers(self) -> tuple[int, ...]:
        return scale_state_layers(self.config.discriminator_layers, self.pruners.config.num_hidden_layers)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This process's rows of step `step`'s batch, on its device."""
        scenes = batch_scenes(self.config.world_seed, step, self.config.batch_size)
        scenes = scenes[self.accelerator.process_index :: self.accelerator.num_processes]
        batch = gan_batch(self.processor, scenes, self.model.config.image_seq_length, self.model.config.image_token_id)
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def generator(self, step: int) -> torch.Generator:
        """The random stream of step `step` in this process (Gumbel noise, then the discriminator's input noise)."""
        seed = (self.config.seed * 1_000_003 + step) * 64 + self.accelerator.process_index
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    def forwards(self, batch: dict, step: int, generator: torch.Generator):
        """Real (unpruned, no gradient) and fake (pruned) forwards, their pooled text states, the temperature, and
        per stage the evaluation's cumulative masks of the fake forward's logits (B, V) (`evaluation_keep_mask`:
        logit > 0, no noise, gradient to that stage's logits only)."""
        temperature = cosine_schedule(*self.config.temperature, step, self.config.steps)
        noise_scale = cosine_schedule(*self.config.gumbel_noise, step, self.config.steps)
        straight_through = self.pruners.config.gumbel == "straight_through"
        evaluation_keep = []

        def stage_masks(stage, visual, question, question_valid, attention):
            logits = self.pruners(stage, visual, question, question_valid, attention)
            mask = evaluation_keep_mask(logits)
            # Earlier stages detached: each multiplier moves its own stage's logits only (else a later stage that
            # keeps too many pushes the earlier ones down against their own multipliers).
            evaluation_keep.append(mask if not evaluation_keep else evaluation_keep[-1].detach() * mask)
            return gumbel_keep_mask(logits, temperature, generator, straight_through, noise_scale)

        with torch.no_grad():
            real = pruned_forward(self.model, batch, self.stage_layers, None, self.state_layers)
        fake = pruned_forward(self.model, batch, self.stage_layers, stage_masks, self.state_layers,
                              self.pruners.merger, self.pruners.config.attention_residual)  # fmt: skip
        real_pooled = pooled_text_states(real, batch["text_mask"], self.state_layers, generator, self.config)
        fake_pooled = pooled_text_states(fake, batch["text_mask"], self.state_layers, generator, self.config)
        return real, fake, real_pooled, fake_pooled, temperature, evaluation_keep

    def generator_step(self, batch, real, fake, fake_pooled, evaluation_keep, step: int) -> dict[str, torch.Tensor]:
        """Update the pruners, then the budget multipliers; the discriminator is unchanged. Returns the unweighted
        terms."""
        terms = loss_terms(real, fake, fake_pooled, batch, self.discriminator, self.targets)
        weights = loss_weights(self.config, step)
        loss = sum(weights[t] * terms[t] for t in LOSS_TERMS)
        if self.config.budget_lr > 0:
            loss = loss + budget_loss(evaluation_keep, self.targets, self.multipliers)
        optimizer_step(self.accelerator, self.pruner_optimizer, loss, self.config)
        ratios = torch.stack([k.detach().mean() for k in evaluation_keep])
        ratios = self.accelerator.reduce(ratios, reduction="mean")  # every process holds the same multipliers
        self.multipliers = dual_ascent(self.multipliers, ratios, self.targets, self.config.budget_lr, self.config.budget_bound)
        return terms

    def discriminator_step(self, real_pooled, fake_pooled) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Update the discriminator on real vs detached fake; the pruners are unchanged. Returns its loss and its
        logits on real and fake (before the update)."""
        real_logits = self.discriminator(real_pooled)
        fake_logits = self.discriminator([p.detach() for p in fake_pooled])
        loss = discriminator_loss(real_logits, fake_logits)
        optimizer_step(self.accelerator, self.discriminator_optimizer, loss, self.config)
        return loss, real_logits.detach(), fake_logits.detach()

    def step(self, step: int) -> dict:
        """One training step; returns its curve row."""
        batch = self.batch(step)
        generator = self.generator(step)
        real, fake, real_pooled, fake_pooled, temperature, evaluation_keep = self.forwards(batch, step, generator)
        multipliers = self.multipliers  # the ones this step's loss used
        terms = self.generator_step(batch, real, fake, fake_pooled, evaluation_keep, step)
        d_loss, real_logits, fake_logits = self.discriminator_step(real_pooled, fake_pooled)
        samples = torch.cat([s.detach().flatten() for s in fake.samples])
        local = {
            **{f"{t}_loss": terms[t].detach() for t in LOSS_TERMS},
            "discriminator_loss": d_loss.detach(),
            "discriminator_accuracy_real": (real_logits > 0).float().mean(),
            "discriminator_accuracy_fake": (fake_logits < 0).float().mean(),
            "undecided_share": ((samples > UNDECIDED[0]) & (samples < UNDECIDED[1])).float().mean(),
            **{f"keep_layer_{layer}": k.detach().mean() for layer, k in zip(self.stage_layers, fake.keep)},
            **{f"eval_keep_layer_{layer}": k.detach().mean() for layer, k in zip(self.stage_layers, evaluation_keep)},
        }
        row = {"step": step + 1, "temperature": round(temperature, 6)}
        row.update({f"multiplier_layer_{layer}": round(float(m), 6) for layer, m in zip(self.stage_layers, multipliers)})
        for name, value in local.items():
            row[name] = round(float(self.accelerator.reduce(value.reshape(1), reduction="mean")), 6)
        return row

    def state(self) -> dict:
        return {
            "pruners": self.pruners.state_dict(), "discriminator": self.discriminator.state_dict(),
            "pruner_optimizer": self.pruner_optimizer.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            "multipliers": self.multipliers,
        }  # fmt: skip

    def load_state(self, state: dict) -> None:
        self.pruners.load_state_dict(state["pruners"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.pruner_optimizer.load_state_dict(state["pruner_optimizer"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.multipliers = state["multipliers"].to(self.multipliers.device)


def plot_curves(rows: list[dict], path: Path) -> None:
    """The training curves, one panel per quantity family, into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    panels = {
        "task loss": ["task_loss"],
        "adversarial losses": ["adversarial_loss", "discriminator_loss"],
        "discriminator accuracy": ["discriminator_accuracy_real", "discriminator_accuracy_fake"],
        "keep ratio per layer (training masks)": [key for key in rows[0] if key.startswith("keep_layer_")],
        "keep ratio per layer (evaluation masks)": [key for key in rows[0] if key.startswith("eval_keep_layer_")],
        "budget multipliers": [key for key in rows[0] if key.startswith("multiplier_layer_")],
        "undecided masks in (0.1, 0.9)": ["undecided_share"],
        "temperature": ["temperature"],
    }
    figure, axes = plt.subplots(2, 4, figsize=(17, 7))
    for axis, (title, keys) in zip(axes.flat, panels.items()):
        for key in keys:
            axis.plot(steps, [row[key] for row in rows], label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        if len(keys) > 1:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def train(
    config: GanTrainConfig,
    model_dir: str | Path,
    output_dir: str | Path,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> Path:
    """Train the pruners of the LLaVA in `model_dir` (a ShapesWorld checkpoint); save them into `output_dir` and
    return it; resumes a run found there (same config, else ValueError)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = GanTrainer.build(config, model_dir, accelerator)
    accelerator = trainer.accelerator
    state_path, curves_path = output_dir / STATE_FILE, output_dir / CURVES_FILE
    start, elapsed = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False, map_location=accelerator.device)
        if state["config"] != asdict(config):
            raise ValueError(f"{state_path} was saved by a run with another config: {state['config']}")
        trainer.load_state(state)
        start, elapsed = state["step"], state["elapsed_s"]
    rows = [json.loads(line) for line in curves_path.read_text().splitlines()][:start] if start else []

    main = accelerator.is_main_process
    if main:  # the curves of the steps after the last saved state are written again
        curves_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="gan-pruner", disable=not (progress and main))
    began = time.perf_counter() - elapsed
    for step in bar:
        row = trainer.step(step)
        rows.append(row)
        if main:
            with curves_path.open("a") as curves:
                curves.write(json.dumps(row) + "\n")
        bar.set_postfix(task=f"{row['task_loss']:.3f}", d_real=f"{row['discriminator_accuracy_real']:.2f}",
                        d_fake=f"{row['discriminator_accuracy_fake']:.2f}", keep=f"{row[f'keep_layer_{trainer.stage_layers[-1]}']:.2f}")  # fmt: skip
        done = step + 1
        if done % config.save_every == 0 and done < config.steps and main:
            state = {"config": asdict(config), "step": done, "elapsed_s": time.perf_counter() - began, **trainer.state()}
            torch.save(state, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)  # never a half-written state
        accelerator.wait_for_everyone()

    if main:
        trainer.pruners.eval().save_pretrained(output_dir)
        plot_curves(rows, output_dir / "curves.png")
        seconds = time.perf_counter() - began
        summary = {"config": asdict(config), "pruning_layers": list(trainer.stage_layers), "targets": list(trainer.targets),
                   "discriminator_layers": list(trainer.state_layers), "train_seconds": round(seconds, 1),
                   "seconds_per_step": round(seconds / config.steps, 3), "processes": accelerator.num_processes,
                   "torch_threads": torch.get_num_threads(), "last": rows[-1]}  # fmt: skip
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        state_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return output_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the GAN layer pruners of a ShapesWorld LLaVA", description=__doc__)
    parser.add_argument("--model", required=True, help="the LLaVA checkpoint (frozen backbone): a folder, a hub id "
                        "(org/name) or shapesworld-smol")
    parser.add_argument("--output-dir", required=True, help="where the pruners, curves and resumable state go")
    for name, value in asdict(GanTrainConfig()).items():
        flag, help_text = f"--{name.replace('_', '-')}", FLAG_HELP.get(name)
        if name in OPTIONAL_TYPES:
            nargs = "+" if name in VARIABLE_LENGTH else None
            parser.add_argument(flag, type=OPTIONAL_TYPES[name], nargs=nargs, default=value, help=help_text)
        elif isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value, metavar="BOOL",
                                help=help_text)  # fmt: skip
        elif isinstance(value, tuple):
            nargs = "+" if name in VARIABLE_LENGTH else len(value)  # the others are (start, end) pairs
            parser.add_argument(flag, type=type(value[0]), nargs=nargs, default=value, help=help_text)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=help_text)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    config = GanTrainConfig(**{name: getattr(args, name) for name in GanTrainConfig.__dataclass_fields__})
    folder = train(config, args.model, args.output_dir, progress=not args.no_progress)
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    print(f"saved {folder}: {summary['train_seconds'] / 60:.1f} min, {summary['seconds_per_step']} s / step, "
          f"last step {summary['last']}")
    return 0
