"""RCPP + DRCD inside `generate`: one forward per token, the schedule's evictions, streaming, sampling."""

import torch
from transformers.generation.streamers import BaseStreamer

from rcpp_hf.rcpp.schedule import scheduled_value, visual_token_budget
from tests.conftest import active_config


def count_forwards(model):
    """Records the query length of every language-model forward (each runs the first decoder layer once)."""
    query_lengths = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args: query_lengths.append(args[0].shape[1])
    )
    return query_lengths, handle


def test_one_forward_per_generated_token(rcpp_model, batch2):
    query_lengths, handle = count_forwards(rcpp_model)
    try:
        out = rcpp_model.generate(
            **batch2, generation_config=active_config(max_new_tokens=12), return_dict_in_generate=True
        )
    finally:
        handle.remove()
    new_tokens = out.sequences.shape[1] - batch2["input_ids"].shape[1]
    assert len(query_lengths) == new_tokens
    assert query_lengths[0] == batch2["input_ids"].shape[1]  # the prefill
    assert 2 in query_lengths[1:], "the contrast row must have been used (two query rows in one forward)"
    assert set(query_lengths[1:]) <= {1, 2}


def test_schedule_evicts_exactly_the_budget(rcpp_model, batch2):
    config = active_config(max_new_tokens=10)
    out = rcpp_model.generate(**batch2, generation_config=config, return_dict_in_generate=True)
    trace, cache = out.rcpp, out.past_key_values
    num_visual = trace.num_visual_tokens
    assert num_visual == 16
    cached = num_visual
    for step in trace.steps:
        keep = scheduled_value(config.keep_ratio_start, config.keep_ratio_end, step.step, config.schedule_steps, "linear")
        lam = scheduled_value(config.lambda_start, config.lambda_end, step.step, config.schedule_steps, "linear")
        assert step.keep_ratio == keep and (step.step == 0 or step.lambda_t == lam)
        expected_evictions = cached - visual_token_budget(keep, num_visual)
        assert step.evicted.shape == (2, expected_evictions)
        cached -= expected_evictions
        assert int(torch.isnan(step.scores[0]).sum()) == num_visual - cached
        assert torch.equal(step.num_core + step.num_noise, torch.full((2,), cached if step.step else num_visual))
    assert cached == visual_token_budget(config.keep_ratio_end, num_visual) == 4
    # Every layer holds the prompt and the fed-back tokens, minus exactly the evicted visual entries.
    expected_length = out.sequences.shape[1] - 1 - (num_visual - cached)
    assert all(layer.keys.shape[2] == expected_length for layer in cache.layers)
    assert cache.num_visual_tokens == cached
    assert trace.steps[-1].visual_cache_bytes * num_visual == trace.steps[0].visual_cache_bytes * cached
    # Kept visual tokens carry their original positions; generated tokens continue the logical positions.
    prompt_positions = (batch2["attention_mask"].cumsum(-1) - 1)
    image_mask = batch2["input_ids"] == rcpp_model.config.image_token_id
    for row in range(2):
        kept_ids = cache.visual_token_ids[row]
        original = prompt_positions[row][image_mask[row]][kept_ids]
        assert torch.equal(cache.positions[row][cache.visual_slots[row]], original)
        last = int(prompt_positions[row, -1])
        generated_positions = cache.positions[row, -(out.sequences.shape[1] - batch2["input_ids"].shape[1] - 1):]
        assert torch.equal(generated_positions, torch.arange(last + 1, last + 1 + generated_positions.numel()))


def test_drcd_changes_the_output(rcpp_model, vanilla_model, batch2):
    """Not a quality claim: a strong contrast on a random model must visibly act on the tokens."""
    expected = vanilla_model.generate(**batch2, max_new_tokens=12, do_sample=False)
    actual = rcpp_model.generate(**batch2, generation_config=active_config(max_new_tokens=12, lambda_end=3.0))
    assert not torch.equal(actual, expected)


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_every_token(rcpp_model, batch1):
    streamer = CollectingStreamer()
    out = rcpp_model.generate(**batch1, generation_config=active_config(max_new_tokens=6), streamer=streamer)
    assert streamer.ended
    assert torch.equal(streamer.chunks[0], batch1["input_ids"])
    streamed = torch.cat([chunk.view(-1) for chunk in streamer.chunks[1:]])
    assert torch.equal(streamed, out[0, batch1["input_ids"].shape[1]:])


def test_seeded_sampling_is_reproducible(rcpp_model, batch2):
    config = active_config(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=50, top_p=0.9)
    torch.manual_seed(3)
    first = rcpp_model.generate(**batch2, generation_config=config)
    torch.manual_seed(3)
    second = rcpp_model.generate(**batch2, generation_config=config)
    torch.manual_seed(4)
    third = rcpp_model.generate(**batch2, generation_config=config)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_eos_stops_a_row_and_pads_it(rcpp_model, batch2):
    greedy = rcpp_model.generate(**batch2, generation_config=active_config(max_new_tokens=8))
    prompt_length = batch2["input_ids"].shape[1]
    eos = int(greedy[0, prompt_length + 2])  # pretend row 0's third token is the end of sequence
    out = rcpp_model.generate(**batch2, generation_config=active_config(max_new_tokens=8, eos_token_id=eos, pad_token_id=0))
    row0 = out[0, prompt_length:].tolist()
    assert row0[:3] == greedy[0, prompt_length:prompt_length + 3].tolist()
    assert all(token == 0 for token in row0[3:])


def test_output_scores_are_the_fused_scores(rcpp_model, batch1):
    out = rcpp_model.generate(
        **batch1, generation_config=active_config(max_new_tokens=5), return_dict_in_generate=True,
        output_scores=True, output_logits=True,
    )
    assert len(out.scores) == len(out.logits) == 5
    chosen = torch.stack([scores.argmax(-1) for scores in out.scores], dim=1)
    assert torch.equal(chosen, out.sequences[:, batch1["input_ids"].shape[1]:])


def test_plausibility_constraint_restricts_to_plausible_tokens(rcpp_model, batch1):
    out = rcpp_model.generate(
        **batch1, generation_config=active_config(max_new_tokens=5, plausibility_beta=0.5, lambda_end=3.0),
        return_dict_in_generate=True, output_scores=True,
    )
    for scores in out.scores:
        assert torch.isinf(scores).any(), "beta = 0.5 must rule out part of the vocabulary"


def test_edge_case_n_empty_uses_no_contrast_row(rcpp_model, batch2):
    query_lengths, handle = count_forwards(rcpp_model)
    try:
        out = rcpp_model.generate(**batch2, generation_config=active_config(max_new_tokens=6, tau=-1.0),
                                  return_dict_in_generate=True)
    finally:
        handle.remove()
    assert set(query_lengths[1:]) == {1}
    assert all(int(step.num_noise.sum()) == 0 for step in out.rcpp.steps)


def test_edge_case_c_empty_main_row_sees_no_visual_token(rcpp_model, batch2):
    query_lengths, handle = count_forwards(rcpp_model)
    try:
        out = rcpp_model.generate(**batch2, generation_config=active_config(max_new_tokens=6, tau=1.0),
                                  return_dict_in_generate=True)
    finally:
        handle.remove()
    assert set(query_lengths[1:]) == {2}
    assert all(int(step.num_core.sum()) == 0 for step in out.rcpp.steps[1:])
    assert torch.isfinite(out.rcpp.steps[-1].scores[~torch.isnan(out.rcpp.steps[-1].scores)]).all()


def test_quantile_tau_puts_a_fixed_share_in_n_every_step(rcpp_model, batch2):
    """tau_mode "quantile" reads the current S of the cached tokens each step: with n of them, N holds the
    floor(tau * (n - 1)) lowest (no ties among these scores), as the cache shrinks from 16 to 4."""
    out = rcpp_model.generate(**batch2, generation_config=active_config(max_new_tokens=8, tau=0.25, tau_mode="quantile"),
                              return_dict_in_generate=True)
    counts = []
    for step in out.rcpp.steps[1:]:
        cached = step.num_core + step.num_noise
        assert torch.equal(step.num_noise, (0.25 * (cached - 1)).floor().long())
        counts.append(int(cached[0]))
    assert counts[0] == 13 and counts[-1] == 4
