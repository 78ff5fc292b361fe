import json

import pytest

from rcpp_hf.eval.chair import (
    CocoAnnotations,
    caption_mentions,
    caption_words,
    chair_metrics,
    score_caption,
)
from rcpp_hf.eval.coco_objects import COCO_SYNONYMS
from tests.eval_helpers import two_image_annotations, write_annotations


def classes(caption):
    return [name for _, name in caption_mentions(caption_words(caption))]


def test_words_are_singularised_and_two_word_phrases_merged():
    assert caption_words("Two dogs and a hot dog near the traffic lights.") == [
        "two", "dog", "and", "a", "hot dog", "near", "the", "traffic light", ".",
    ]
    assert classes("Two dogs and a hot dog near the traffic lights.") == ["dog", "hot dog", "traffic light"]


@pytest.mark.parametrize(
    "caption, expected",
    [
        # "baby" + animal is the animal, not a person; "train track" is no train
        ("A baby elephant walks beside a man on the train tracks.", ["elephant", "person"]),
        # "toilet seat" is the toilet, and no other "seat" counts as a chair beside a toilet
        ("The toilet seat is up and a seat is nearby.", ["toilet"]),
        ("A chair and a seat.", ["chair", "chair"]),
        # CHAIR does not read negation
        ("There is no dog.", ["dog"]),
        # possessives, irregular plurals, plurals equal to the singular
        ("The woman's knives, mice and sheep.", ["person", "knife", "mouse", "sheep"]),
        ("A passenger jet and a man in a bow tie.", ["airplane", "person", "tie"]),
        ("People with cell phones on a sofa; a TV and a laptop computer.", ["person", "cell phone", "couch", "tv", "laptop"]),
        ("Skis and a pair of scissors.", ["skis", "scissors"]),
        # the reference never matches these (stray spaces in its list); neither do we
        ("A motor bike and a cheesecake.", []),
        # singularisation only: the verb "skiing" is not the object "skis"
        ("A man skiing.", ["person"]),
        ("A hot-dog stand.", []),  # hyphenated words stay one token, as in NLTK's tokenizer
    ],
)
def test_hand_checked_caption_mentions(caption, expected):
    assert classes(caption) == expected


def test_every_class_name_maps_to_itself():
    assert len(COCO_SYNONYMS) == 80
    for name in COCO_SYNONYMS:
        assert classes(f"a {name} .") == [name], name


def test_chair_metrics_against_hand_counts(tmp_path):
    coco = CocoAnnotations(two_image_annotations(tmp_path / "annotations"))
    assert coco.objects(42) == {"person", "dog", "bench"}  # instances: person, dog; captions add bench
    assert coco.objects(73) == {"pizza", "dining table"}
    first = score_caption("A man and his dog sit on a bench next to a fire hydrant. Two cats sleep nearby.", coco.objects(42))
    second = score_caption("A pizza on a plate.", coco.objects(73))
    assert first.mentions == [("man", "person"), ("dog", "dog"), ("bench", "bench"), ("fire hydrant", "fire hydrant"), ("cat", "cat")]
    assert first.hallucinated == [("fire hydrant", "fire hydrant"), ("cat", "cat")]
    assert first.recalled == ["bench", "dog", "person"]
    assert (first.length, second.length) == (19, 6)
    assert second.hallucinated == [] and second.recalled == ["pizza"]
    metrics = chair_metrics([first, second])
    assert metrics["chair_s"] == pytest.approx(1 / 2)
    assert metrics["chair_i"] == pytest.approx(2 / 6)
    assert metrics["recall"] == pytest.approx(4 / 5)
    assert metrics["length"] == pytest.approx(12.5)
    assert (metrics["n_captions"], metrics["n_mentions"], metrics["n_hallucinated_mentions"]) == (2, 6, 2)


def test_image_sample_is_seeded_and_sorted(tmp_path):
    images = {image_id: f"COCO_val2014_{image_id:012d}.jpg" for image_id in range(1, 41)}
    coco = CocoAnnotations(write_annotations(tmp_path / "annotations", images, [], []))
    sample = coco.sample_image_ids(10, seed=0)
    assert sample == sorted(sample) and len(set(sample)) == 10
    assert coco.sample_image_ids(10, seed=0) == sample
    assert coco.sample_image_ids(10, seed=1) != sample
    with pytest.raises(ValueError, match="asked for 41 images, the annotations have 40"):
        coco.sample_image_ids(41, seed=0)


def test_wrong_annotation_folder_is_named(tmp_path):
    folder = tmp_path / "annotations"
    folder.mkdir()
    (folder / "instances_val2017.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"instances_val2014.json.*not found \(it has instances_val2017.json\)"):
        CocoAnnotations(folder)
    two_image_annotations(folder)
    (folder / "instances_val2014.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="instances_val2014.json: not a COCO annotation file of this kind .missing categories"):
        CocoAnnotations(folder)
    (folder / "instances_val2014.json").write_text("not json")
    with pytest.raises(ValueError, match="instances_val2014.json: not a COCO annotation file"):
        CocoAnnotations(folder)
