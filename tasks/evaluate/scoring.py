"""Log-likelihoods from a causal LM, batched, as lm-evaluation-harness computes them.

Everything scored is a `Window`: input ids, the ids they predict (inputs shifted by one), and how
many of the last targets count. A (context, continuation) request becomes the window
`(context + continuation)[-(seq_len + 1):]` less its last id, scoring the continuation (the harness's
left truncation, `_loglikelihood_tokens`); a held-out text becomes strided windows.

Windows are sorted longest first and packed into batches of at most `batch_tokens` (padding
included, and at most a fifth of the batch), right-padded: the model is causal, so padding after a
sequence never changes it. Only the scored positions go through the output layer, and
log-probabilities are normalised over the real vocabulary (the embedding's padding rows are left
out), exactly as the exported HF model does.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from storage.formats import ModelSpec
from tasks.training.runtime import autocast

LOGIT_BYTES = 1 << 28          # logits computed in chunks of at most this many fp32 bytes
PADDING_SLACK = 1.25           # a batch's padded size stays within 1.25x its real tokens


@dataclass(frozen=True)
class Window:
    """`inputs[i]` predicts `targets[i]`; the last `n_scored` targets are scored."""

    inputs: list[int]
    targets: list[int]
    n_scored: int


@dataclass(frozen=True)
class Score:
    logprob: float             # sum of the scored targets' log-probabilities (natural log)
    argmax: tuple[int, ...]    # the most likely id at each scored position (ties: the lowest id)
    targets: tuple[int, ...]

    @property
    def greedy(self) -> bool:
        """Every scored target is the argmax of its distribution (the harness's `is_greedy`)."""
        return self.argmax == self.targets


def request_window(context: list[int], continuation: list[int], seq_len: int) -> Window:
    """The harness's window: the joint sequence cut from the left to seq_len + 1 ids, less the last."""
    if not context or not continuation:
        raise ValueError("a request needs at least one context and one continuation token")
    if len(continuation) > seq_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit a window of {seq_len}")
    joint = (context + continuation)[-(seq_len + 1):]
    return Window(joint[:-1], joint[1:], len(continuation))


def strided_windows(tokens: list[int], prefix_id: int, seq_len: int, stride: int) -> list[Window]:
    """Windows that score every token of `tokens` once, `prefix_id` standing before the first.

    Windows start `stride` tokens apart; each scores only the tokens the previous ones did not, so
    every token after the first window sees at least `seq_len - stride` tokens of context.
    """
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride {stride} must be in 1..seq_len ({seq_len})")
    sequence, windows, scored, begin = [prefix_id, *tokens], [], 0, 0
    while scored < len(tokens):
        end = min(begin + seq_len, len(tokens))
        windows.append(Window(sequence[begin:end], sequence[begin + 1:end + 1], end - scored))
        scored, begin = end, begin + stride
    return windows


class Scorer:
    """Scores windows with a GPT (anything with `hidden_states` and `logits`) on one device."""

    def __init__(self, model: nn.Module, spec: ModelSpec, device: torch.device, precision: str = "fp32",
                 batch_tokens: int = 16384) -> None:
        self.model, self.spec, self.device = model, spec, device
        self.precision, self.batch_tokens = precision, batch_tokens

    def score(self, windows: list[Window]) -> list[Score]:
        """One Score per window, in the order given."""
        scores: list[Score | None] = [None] * len(windows)
        for batch in self.batches([len(w.inputs) for w in windows]):
            for index, score in zip(batch, self._score_batch([windows[i] for i in batch])):
                scores[index] = score
        return scores  # type: ignore[return-value]

    def batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """Indices, longest first, in batches within batch_tokens (padding included) and at most 20% padding."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        batch: list[int] = []
        real = 0
        for index in order:
            padded = (len(batch) + 1) * (lengths[batch[0]] if batch else lengths[index])
            if batch and (padded > self.batch_tokens or padded > PADDING_SLACK * (real + lengths[index])):
                yield batch
                batch, real = [], 0
            batch.append(index)
            real += lengths[index]
        if batch:
            yield batch

    @torch.no_grad()
    def _score_batch(self, windows: list[Window]) -> list[Score]:
        ids, rows, cols, targets = self._pack(windows)
        with autocast(self.device, self.precision):
            hidden = self.model.hidden_states(ids)
        logprob, argmax = self._target_logprobs(hidden[rows, cols], targets)
        counts = [w.n_scored for w in windows]
        segment = torch.repeat_interleave(torch.arange(len(windows), device=self.device),
                                          torch.tensor(counts, device=self.device))
        sums = torch.zeros(len(windows), dtype=torch.float64, device=self.device).index_add_(0, segment, logprob)
        argmax_ids, target_ids = _split(argmax.tolist(), counts), _split(targets.tolist(), counts)
        return [Score(s, a, t) for s, a, t in zip(sums.tolist(), argmax_ids, target_ids)]

    def _pack(self, windows: list[Window]) -> tuple[torch.Tensor, ...]:
        """Right-padded ids, and (row, column, target) of every scored position."""
        width = max(len(w.inputs) for w in windows)
        ids = torch.zeros(len(windows), width, dtype=torch.long)
        rows, cols, targets = [], [], []
        for row, window in enumerate(windows):
            length = len(window.inputs)
            ids[row, :length] = torch.tensor(window.inputs, dtype=torch.long)
            rows += [row] * window.n_scored
            cols += range(length - window.n_scored, length)
            targets += window.targets[length - window.n_scored:]
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        return ids.to(self.device), as_tensor(rows), as_tensor(cols), as_tensor(targets)

    def _target_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(target) over the real vocabulary, and the argmax id, per position."""
        chunk = max(1, LOGIT_BYTES // (4 * self.spec.vocab_size))
        logprobs, argmax = [], []
        for start in range(0, hidden.shape[0], chunk):
            with autocast(self.device, self.precision):
                logits = self.model.logits(hidden[start:start + chunk])
            logits = logits[:, : self.spec.vocab_size].float()
            wanted = targets[start:start + chunk]
            logprobs.append(F.log_softmax(logits, dim=-1).gather(1, wanted[:, None]).squeeze(1))
            argmax.append(logits.argmax(dim=-1))
        return torch.cat(logprobs).double(), torch.cat(argmax)

    @torch.no_grad()
    def greedy_continuations(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """`max_new_tokens` greedy ids after each prompt (KV-cached), prompts batched by equal length.

        Prompts are cut from the left so that prompt and continuation fit one window (the harness's
        `generate_until` does the same); equal lengths need no padding, so batching changes nothing.
        """
        keep = max(1, self.spec.seq_len - max_new_tokens)
        prompts = [prompt[-keep:] for prompt in prompts]
        out: list[list[int] | None] = [None] * len(prompts)
        rows = max(1, self.batch_tokens // self.spec.seq_len)
        for indices in _same_length_groups(prompts, rows):
            idx = torch.tensor([prompts[i] for i in indices], dtype=torch.long, device=self.device)
            with autocast(self.device, self.precision):
                generated = self.model.generate(idx, max_new_tokens, temperature=0)
            for i, row in zip(indices, generated[:, idx.shape[1]:].tolist()):
                out[i] = row
        return out  # type: ignore[return-value]


def _split(values: list[int], counts: list[int]) -> list[tuple[int, ...]]:
    out, start = [], 0
    for count in counts:
        out.append(tuple(values[start:start + count]))
        start += count
    return out


def _same_length_groups(prompts: list[list[int]], rows: int) -> Iterator[list[int]]:
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), rows):
            yield group[start:start + rows]
