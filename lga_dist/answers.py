"""Answers after prompts: tokenisation, batching and NLL, shared by training, scoring, editing and evaluation.

The answer is appended with a leading space, as CounterFact evaluation does, and
the text is tokenised once; the answer tokens are those that start at or after
the end of the prompt (found from the fast tokenizer's offsets). Tokenising the
whole text once keeps the result right for tokenizers that would spell a
separately tokenised " answer" differently (sentencepiece's leading '▁').
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class PromptAnswer:
    input_ids: list[int]
    answer_start: int  # index of the first answer token

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.answer_start:]


def encode_prompt_answer(tokenizer, prompt: str, answer: str) -> PromptAnswer:
    text = prompt + " " + answer
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    start = next((i for i, ((begin, end), token) in enumerate(zip(offsets, ids))
                  if begin >= len(prompt) and end > begin and token not in special), len(ids))
    if start == len(ids) or start == 0:
        raise ValueError(f"cannot separate the answer {answer!r} from the prompt {prompt!r} in the tokenisation")
    return PromptAnswer(list(ids), start)


@dataclasses.dataclass
class AnswerBatch:
    """Right-padded sequences with, per sequence, the positions whose next token is an answer token."""

    input_ids: torch.Tensor        # (N, T)
    attention_mask: torch.Tensor   # (N, T)
    predict_positions: torch.Tensor  # (N, A): position whose logits predict answer token a
    answer_ids: torch.Tensor       # (N, A)
    answer_mask: torch.Tensor      # (N, A) 1 for real answer tokens

    def to(self, device: torch.device | str) -> "AnswerBatch":
        return AnswerBatch(*(t.to(device) for t in dataclasses.astuple(self)))


def collate(items: Sequence[PromptAnswer], pad_id: int) -> AnswerBatch:
    width = max(len(item.input_ids) for item in items)
    answers = max(len(item.answer_ids) for item in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    predict = torch.zeros((n, answers), dtype=torch.long)
    answer_ids = torch.zeros((n, answers), dtype=torch.long)
    answer_mask = torch.zeros((n, answers), dtype=torch.long)
    for row, item in enumerate(items):
        length, count = len(item.input_ids), len(item.answer_ids)
        input_ids[row, :length] = torch.tensor(item.input_ids)
        attention_mask[row, :length] = 1
        predict[row, :count] = torch.arange(item.answer_start - 1, length - 1)
        answer_ids[row, :count] = torch.tensor(item.answer_ids)
        answer_mask[row, :count] = 1
    return AnswerBatch(input_ids, attention_mask, predict, answer_ids, answer_mask)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 before a softmax; float32 and float64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def answer_nll(logits_at: torch.Tensor, batch: AnswerBatch) -> torch.Tensor:
    """Mean negative log-likelihood of each sequence's answer tokens, shape (N,).

    ``logits_at`` holds the logits at ``batch.predict_positions``, shape (N, A, V).
    """
    log_probs = torch.log_softmax(at_least_float32(logits_at), dim=-1)
    token_log_probs = log_probs.gather(-1, batch.answer_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.answer_mask.to(token_log_probs.dtype)
    return -(token_log_probs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def answer_logits(model: torch.nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Logits at the answer-predicting positions only, shape (N, A, V).

    Runs the transformer body (final norm included) and applies the LM head to
    the few positions that predict answer tokens instead of the whole sequence.
    """
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    index = batch.predict_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return model.get_output_embeddings()(hidden.gather(1, index))
