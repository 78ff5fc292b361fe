"""`TokenChoice`: the end of every decoding step of transformers' `_sample` (transformers 5.23,
generation/utils.py), shared by rcpp_hf's loops: logits processors, the recorded scores and logits, greedy or
multinomial choice, padding of finished rows, and the stopping criteria with the streamer."""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from transformers.generation.utils import StopCheck


class TokenChoice:
    """Per `generate` call: `next_tokens` after each forward, then `done` once the tokens are appended.

    `scores` / `logits` hold what `output_scores` / `output_logits` ask for (None otherwise), as `_sample` returns them.
    """

    def __init__(self, generation_config: GenerationConfig, logits_processor, stopping_criteria, streamer,
                 input_ids: torch.LongTensor):  # fmt: skip
        config = generation_config
        self.do_sample = config.do_sample
        self.logits_processor, self.stopping_criteria = logits_processor, stopping_criteria
        self.pad_token_id = None if config._pad_token_tensor is None else config._pad_token_tensor.to(input_ids.device)
        self.has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        self.scores = () if (config.return_dict_in_generate and config.output_scores) else None
        self.logits = () if (config.return_dict_in_generate and config.output_logits) else None
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        self.stop_check = StopCheck(streamer)

    def next_tokens(self, input_ids: torch.LongTensor, next_token_logits: torch.Tensor) -> torch.LongTensor:
        """The tokens chosen from `next_token_logits` (batch, vocab); finished rows get the pad token."""
        next_token_scores = self.logits_processor(input_ids, next_token_logits)
        if self.scores is not None:
            self.scores += (next_token_scores,)
        if self.logits is not None:
            self.logits += (next_token_logits,)
        if self.do_sample:
            next_tokens = torch.multinomial(next_token_scores.softmax(dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if self.has_eos_stopping_criteria:
            next_tokens = next_tokens * self.unfinished + self.pad_token_id * (1 - self.unfinished)
        return next_tokens

    def done(self, input_ids: torch.LongTensor, next_tokens: torch.LongTensor) -> bool:
        """Whether every row has stopped, `input_ids` already holding `next_tokens` (streams them)."""
        self.unfinished = self.unfinished & ~self.stopping_criteria(input_ids, self.scores)
        return self.stop_check(self.unfinished, next_tokens, input_ids.shape[1])
