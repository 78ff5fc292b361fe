"""Training: the conversation encoding matches inference prompts; a tiny run is reproducible and resumable."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from rcpp_hf.shapesworld import train as train_module
from rcpp_hf.shapesworld.conversations import (
    POPE_SUFFIX,
    chat_prompt,
    encode_packed,
    llava_prompt,
    pope_prompt,
    training_turns,
)
from rcpp_hf.shapesworld.model import SHAPESWORLD_SPEC, build_shapesworld_llava
from rcpp_hf.shapesworld.render import render_scene
from rcpp_hf.shapesworld.train import (
    TrainConfig,
    batch_scenes,
    language_loss,
    learning_rate,
    patch_targets,
    train,
    training_batch,
)
from rcpp_hf.shapesworld.world import (
    COLOURS,
    KINDS,
    TEST_SEED,
    Scene,
    ShapeObject,
    sample_scene,
)

# A model small enough to train a few steps in seconds; same code path as the shipped one.
SMALL = replace(SHAPESWORLD_SPEC, image_size=32, patch_size=8, vision_hidden=32, vision_layers=1,
                text_hidden=32, text_layers=2, num_heads=4, num_kv_heads=2)  # fmt: skip
SMOKE = TrainConfig(steps=4, batch_size=2, warmup_steps=1, save_every=2)


@pytest.fixture(scope="module")
def processor():
    return build_shapesworld_llava(SMALL)[1]


def test_each_packed_example_is_exactly_the_inference_prompt(processor):
    scene = sample_scene(0, 3)
    turns = [(pope_prompt("Is there a star in the image?"), "No"), ("Describe the image.", "a red circle.")]
    packed = encode_packed(turns, processor.tokenizer, SMALL.num_visual_tokens)
    eos = processor.tokenizer.eos_token_id
    for segment, (prompt, answer) in enumerate(turns, start=1):
        assert chat_prompt(processor, prompt) == llava_prompt(prompt)
        expected = processor(images=render_scene(scene), text=llava_prompt(prompt), return_tensors="pt")["input_ids"][0].tolist()
        reply = processor.tokenizer(" " + answer, add_special_tokens=False).input_ids + [eos]
        mine = [i for i, s in enumerate(packed.segments) if s in (0, segment)]
        assert [packed.input_ids[i] for i in mine] == expected + reply
        assert [packed.position_ids[i] for i in mine] == list(range(len(expected) + len(reply)))
        assert [packed.labels[i] for i in mine] == [-100] * len(expected) + reply


def test_packed_forward_equals_separate_single_turn_forwards():
    model, processor = build_shapesworld_llava(SMALL)
    scenes = batch_scenes(0, 0, 2)
    batch = training_batch(processor, scenes, SMALL.num_visual_tokens)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}).logits
        for row, scene in enumerate(scenes):
            segments = encode_packed(training_turns(scene), processor.tokenizer, SMALL.num_visual_tokens).segments
            for segment, (prompt, answer) in enumerate(training_turns(scene), start=1):
                text = llava_prompt(prompt) + " " + answer
                single = processor(images=render_scene(scene), text=text, return_tensors="pt")
                mine = [i for i, s in enumerate(segments) if s in (0, segment)][: single["input_ids"].shape[1]]
                torch.testing.assert_close(packed_logits[row, mine], model(**single).logits[0], atol=1e-5, rtol=1e-5)


def test_batch_is_a_function_of_seed_and_step(processor):
    a = training_batch(processor, batch_scenes(0, 5, 2), SMALL.num_visual_tokens)
    b = training_batch(processor, batch_scenes(0, 5, 2), SMALL.num_visual_tokens)
    c = training_batch(processor, batch_scenes(0, 6, 2), SMALL.num_visual_tokens)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    assert ((a["labels"] != -100) <= (a["input_ids"] != processor.tokenizer.pad_token_id)).all()
    assert a["attention_mask"].shape == (2, 1, a["input_ids"].shape[1], a["input_ids"].shape[1])


def test_loss_weights_favour_answers_over_the_caption_and_unit_weights_give_the_usual_loss(processor):
    model = build_shapesworld_llava(SMALL)[0]
    scenes = batch_scenes(0, 1, 2)
    batch = training_batch(processor, scenes, SMALL.num_visual_tokens, answer_loss_weight=4.0)
    labels, weights = batch.pop("labels"), batch.pop("loss_weights")
    assert ((weights > 0) == (labels != -100)).all()
    for row, scene in enumerate(scenes):
        segments = encode_packed(training_turns(scene), processor.tokenizer, SMALL.num_visual_tokens).segments
        labelled = [i for i, label in enumerate(labels[row].tolist()) if label != -100]
        # Caption tokens (example 1) weigh 1; every question's answer (yes / no, a count, a colour) and its eos 4.
        assert [weights[row, i].item() for i in labelled] == [1.0 if segments[i] == 1 else 4.0 for i in labelled]
    with torch.no_grad():
        out = model(**batch, labels=labels)
        torch.testing.assert_close(language_loss(out.logits, labels, (labels != -100).float()), out.loss)


def test_learning_rate_schedule():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 55) == pytest.approx(0.5)
    assert learning_rate(config, 100) == pytest.approx(0.0)


def test_patch_targets_name_the_object_under_each_patch():
    scene = Scene(0, 0, (ShapeObject("square", "blue", "normal", 0, 0, 26.67, 26.67),
                         ShapeObject("star", "red", "small", 2, 2, 133.3, 133.3)))  # fmt: skip
    kinds, colours = patch_targets([scene], patches_per_side=10)
    grid = kinds.view(10, 10)
    square, star = 1 + list(KINDS).index("square"), 1 + list(KINDS).index("star")
    # The normal square (half-side 0.75 * 21.3 px around (26.7, 26.7)) fully covers patches (1, 1) and its neighbours.
    assert grid[1, 1] == square and grid[0, 0] == square and grid[2, 2] == square
    assert grid[8, 8] == star and (grid == star).sum() >= 1
    assert grid[5, 5] == 0 and grid[0, 9] == 0
    assert set(colours[kinds == square].tolist()) == {list(COLOURS).index("blue")}
    assert (colours[kinds == 0] == -100).all()


@pytest.mark.parametrize(
    "field, value", [("steps", 0), ("batch_size", 0), ("lr", 0.0), ("warmup_steps", 4), ("world_seed", TEST_SEED)]
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{"steps": 4, "warmup_steps": 1, field: value})


def test_tiny_run_is_reproducible_and_resumes_after_a_crash(tmp_path, monkeypatch):
    straight = train(SMOKE, tmp_path / "straight", spec=SMALL, progress=False)

    real_batch = train_module.training_batch

    def crash_at_step_3(processor, scenes, *args, **kwargs):
        if scenes == batch_scenes(0, 3, SMOKE.batch_size):
            raise KeyboardInterrupt("simulated crash")
        return real_batch(processor, scenes, *args, **kwargs)

    monkeypatch.setattr(train_module, "training_batch", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(SMOKE, tmp_path / "resumed", spec=SMALL, progress=False)
    assert (tmp_path / "resumed" / train_module.STATE_FILE).exists()  # saved after step 2
    monkeypatch.setattr(train_module, "training_batch", real_batch)
    with pytest.raises(ValueError, match="another config"):
        train(replace(SMOKE, lr=1e-4), tmp_path / "resumed", spec=SMALL, progress=False)
    resumed = train(SMOKE, tmp_path / "resumed", spec=SMALL, progress=False)

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (resumed / train_module.STATE_FILE).exists()


def test_binding_rounds_add_colour_and_position_pairs_and_one_round_is_the_usual_mixture():
    scene = next(s for s in (sample_scene(0, i) for i in range(50)) if len(s.kinds) >= 3 and len(s.objects) == len(s.kinds))
    usual = training_turns(scene)
    assert training_turns(scene, binding_rounds=1) == usual
    more = training_turns(scene, binding_rounds=3)
    bare = [(question.removesuffix(POPE_SUFFIX), answer) for question, answer in more]
    assert bare[: len(usual)] == [(q.removesuffix(POPE_SUFFIX), a) for q, a in usual]  # the extra rounds come after
    extra = [question for question, _ in bare[len(usual):]]
    assert len(extra) == 8  # 2 rounds x (colour pair + position pair), both answers of each
    assert sum(q.startswith("Is the") for q in extra) == 8
    with pytest.raises(ValueError, match="binding_rounds"):
        TrainConfig(binding_rounds=0)
