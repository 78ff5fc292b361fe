"""Fixture writers and helpers shared by the evaluation tests."""

import json

from rcpp_hf.eval.harness import RunOptions

# COCO category ids of the classes the fixtures use.
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 59, "name": "pizza"}]


def write_annotations(folder, images, instances, captions, categories=CATEGORIES):
    """images: {id: file name}; instances: [(image id, category id)]; captions: [(image id, text)]."""
    folder.mkdir(parents=True, exist_ok=True)
    image_rows = [{"id": image_id, "file_name": name, "width": 40, "height": 30} for image_id, name in images.items()]
    (folder / "instances_val2014.json").write_text(json.dumps({
        "images": image_rows,
        "annotations": [
            {"id": i, "image_id": image_id, "category_id": category, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
            for i, (image_id, category) in enumerate(instances)
        ],
        "categories": categories,
    }))
    (folder / "captions_val2014.json").write_text(json.dumps({
        "images": image_rows,
        "annotations": [{"id": i, "image_id": image_id, "caption": text} for i, (image_id, text) in enumerate(captions)],
    }))
    return folder


def two_image_annotations(folder):
    return write_annotations(
        folder,
        images={42: "COCO_val2014_000000000042.jpg", 73: "COCO_val2014_000000000073.jpg"},
        instances=[(42, 1), (42, 18), (42, 18), (73, 59)],
        captions=[
            (42, "A man walking his dog."),
            (42, "A person with a puppy next to a bench."),
            (73, "A pizza on a table."),
            (73, "A slice of pizza."),
        ],
    )


def write_mme(root, make_image_files):
    """existence: two images side by side with their question files; artwork: images/ + questions_answers_YN/."""
    existence = root / "existence"
    make_image_files(existence, ["a.jpg", "b.png"])
    (existence / "a.txt").write_text("Is there a dog in this image? Please answer yes or no.\tYes\nIs there a cat in this image?  Please answer yes or no.\tNo\n")
    (existence / "b.txt").write_text("Is there a car in this image? Please answer yes or no.\tyes\nIs there a bus in this image? Please answer yes or no.\tNo\n")
    make_image_files(root / "artwork" / "images", ["x.jpg"])
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "x.txt").write_text("Is this painted by Monet?\tNo\nIs this a portrait?\tYes\n")
    return root


def write_pope_parquet(path, rows, image_bytes):
    """rows: (question_id, question, answer, image_source, category); every row gets the same image."""
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"),
        "question_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "image_source": datasets.Value("string"),
        "image": datasets.Image(),
        "category": datasets.Value("string"),
    })
    columns = {
        "id": [str(i) for i in range(len(rows))],
        "question_id": [row[0] for row in rows],
        "question": [row[1] for row in rows],
        "answer": [row[2] for row in rows],
        "image_source": [row[3] for row in rows],
        "image": [{"bytes": image_bytes, "path": None}] * len(rows),
        "category": [row[4] for row in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))


def options(varied_tiny_path, output_dir, **overrides):
    settings = {"model": varied_tiny_path, "batch_size": 4, "max_new_tokens": 4, "device": "cpu", **overrides}
    return RunOptions(output_dir=output_dir, **settings)


def without_timing(records):
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


