"""The MC-LCBF grid of the README section "MC-LCBF": ShapesWorld test world (seed 2), greedy, 50 images.

POPE (three splits) for prefill-phase settings, captions for decode-phase settings, each beside vanilla; answers
flipped against vanilla (and how many flips were corrections). Resumable: every run is an `evaluate` folder.
"note" in a row's name: the settings MC-LCBF's author gave with the original code.
    python experiments/mc_lcbf_grid.py OUTPUT_DIR
"""

import json
import sys
from pathlib import Path

from rcpp_hf.default_model import default_model_path
from rcpp_hf.methods import MCLCBF
from rcpp_hf.shapesworld.evaluate import EvalSettings, evaluate
from rcpp_hf.shapesworld.world import TEST_SEED

POPE = {  # prefill phase only (the decode phase cannot change a yes/no answer)
    "note-strong": MCLCBF(decode=False, prefill_tau=0.5, prefill_alpha=4.0),  # the author's "alpha 4, tau 0.5"
    "tau0.5-a4-unclamped": MCLCBF(decode=False, prefill_tau=0.5, prefill_alpha=4.0, max_scale=1e4),
    "tau0.9-a1-unclamped": MCLCBF(decode=False, prefill_tau=0.9, prefill_alpha=1.0, max_scale=1e4),
}
CAPTIONS = {  # decode phase only
    "note-default": MCLCBF(prefill=False),  # tau 0.2, alpha 0.5, clamp 0.5
    "tau0.9-a1-unclamped": MCLCBF(prefill=False, decode_tau=0.9, decode_alpha=1.0, max_scale=1e4),
}
SPLITS = {"adversarial": POPE, "captions": CAPTIONS, "random": POPE, "popular": POPE}


def records(folder: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, (folder / "answers.jsonl").read_text().splitlines())}


def main(output: Path, num_images: int = 50) -> None:
    model = str(default_model_path())
    table = {}
    for split, settings in SPLITS.items():
        runs = {"vanilla": None, **settings}
        for name, method in runs.items():
            folder = output / split / name
            metrics = evaluate(EvalSettings(model=model, split=split, seed=TEST_SEED, num_images=num_images,
                                            method=None if method is None else method.to_dict()), folder, progress=False)
            row = {k: metrics[k] for k in ("accuracy", "f1", "yes_ratio", "chair_s", "chair_i", "recall", "length",
                                           "prefill_ms", "decode_ms") if k in metrics}
            base, ours = records(output / split / "vanilla"), records(folder)
            if split != "captions":
                flips = [i for i in base if base[i]["prediction"] != ours[i]["prediction"]]
                row["flipped"] = len(flips)
                row["corrections"] = sum(ours[i]["prediction"] == ours[i]["label"] for i in flips)
                row["n"] = len(base)
            else:
                row["changed_captions"] = sum(base[i]["answer"] != ours[i]["answer"] for i in base)
            table[f"{split}/{name}"] = row
            print(split, name, json.dumps(row), flush=True)
    (output / "grid.json").write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
