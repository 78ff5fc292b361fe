"""Evaluation harness: POPE, CHAIR and MME on LLaVA checkpoints, resumable and shardable with accelerate.

    from rcpp_hf.eval import RunOptions, evaluate_pope
    metrics = evaluate_pope(["coco_pope_adversarial.json"], "val2014/",
                            RunOptions(output_dir="runs/pope_adv", model="llava-hf/llava-1.5-7b-hf",
                                       config="rcpp_default", batch_size=8))
"""

from rcpp_hf.eval.chair import evaluate_chair
from rcpp_hf.eval.mme import evaluate_mme
from rcpp_hf.eval.pope import evaluate_pope, parse_yes_no, pope_metrics
from rcpp_hf.eval.report import write_report
from rcpp_hf.eval.results import ResultsFile
from rcpp_hf.eval.harness import EvalItem, RunOptions, run_quality_eval

__all__ = [
    "EvalItem",
    "ResultsFile",
    "RunOptions",
    "evaluate_chair",
    "evaluate_mme",
    "evaluate_pope",
    "parse_yes_no",
    "pope_metrics",
    "run_quality_eval",
    "write_report",
]
