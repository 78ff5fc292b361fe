import json

import pytest

from rcpp_hf.eval.results import ResultsFile


def test_append_read_and_done_ids(tmp_path):
    results = ResultsFile(tmp_path / "run" / "answers.jsonl")
    assert results.read() == [] and results.done_ids() == set()
    results.append({"id": "a/1", "answer": "Yes"})
    results.extend([{"id": "a/2", "answer": "No"}, {"id": 3, "answer": "ünïcode"}])
    assert results.read() == [{"id": "a/1", "answer": "Yes"}, {"id": "a/2", "answer": "No"}, {"id": 3, "answer": "ünïcode"}]
    assert results.done_ids() == {"a/1", "a/2", 3}


def test_truncated_last_line_is_skipped_then_cut_on_append(tmp_path):
    path = tmp_path / "answers.jsonl"
    results = ResultsFile(path)
    results.extend([{"id": 1, "answer": "Yes"}, {"id": 2, "answer": "No"}])
    with open(path, "a") as handle:  # a crash in the middle of writing record 3
        handle.write('{"id": 3, "ans')
    assert results.done_ids() == {1, 2}
    results.append({"id": 3, "answer": "Yes"})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"id": 1, "answer": "Yes"},
        {"id": 2, "answer": "No"},
        {"id": 3, "answer": "Yes"},
    ]


def test_a_corrupt_line_inside_the_file_is_an_error(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"answers.jsonl, line 2: not a JSON record"):
        ResultsFile(path).read()
    with pytest.raises(ValueError, match="needs an 'id'"):
        ResultsFile(path).append({"answer": "Yes"})
