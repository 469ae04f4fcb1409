"""Held-out language modelling on text files: loss, perplexity and bits per byte; BERT: masked-LM loss.

Bits per byte = (sum of the tokens' negative log-likelihoods in nats) / ln 2 / (UTF-8 bytes of the
text): it does not depend on the tokenizer, so models with different vocabularies compare. A GPT
scores every token of the text once, the first after the end-of-text token (as the harness's
rolling log-likelihood does), in strided windows of `seq_len`. A BERT is scored by masked-LM loss
on `[CLS] chunk [SEP]` windows, with BERT's 15% / 80-10-10 corruption drawn per window from
(seed, file, window number), so the score does not depend on how windows are batched.
"""
from __future__ import annotations

import math
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn

from storage.formats import ModelSpec
from storage.sampling import unit_hash
from storage.stage import StageError
from tasks.evaluate.scoring import Scorer, strided_windows
from tasks.pretrain.objectives import Masker
from tasks.training.runtime import autocast

EOT = "<|endoftext|>"
MLM_PROBABILITY = 0.15


def read_text(path: Path | str, max_chars: int | None) -> str:
    """The file's text, or its first lines up to `max_chars` characters (cut at a line end where there is one)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"heldout: {path}: file not found") from None
    except UnicodeDecodeError as err:
        raise StageError(f"heldout: {path}: not UTF-8 ({err})") from None
    if max_chars is not None and len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars) + 1
        text = text[: cut or max_chars]
    if not text.strip():
        raise StageError(f"heldout: {path}: no text to score")
    return text


def causal_lm(scorer: Scorer, encoding: tiktoken.Encoding, text: str, stride: int) -> dict[str, float]:
    """bpb, loss (nats per token), ppl, and the token, byte and window counts of one text."""
    tokens = encoding.encode_ordinary(text)
    windows = strided_windows(tokens, scorer.spec.special_tokens[EOT], scorer.spec.seq_len, stride)
    nll = -sum(score.logprob for score in scorer.score(windows))
    n_bytes = len(text.encode("utf-8"))
    loss = nll / len(tokens)
    return {"bpb": nll / math.log(2) / n_bytes, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "tokens": len(tokens), "bytes": n_bytes, "windows": len(windows)}


def masked_lm(model: nn.Module, spec: ModelSpec, encoding: tiktoken.Encoding, text: str, salt: str,
              device: torch.device, precision: str, batch_tokens: int) -> dict[str, float]:
    """mlm_loss (nats per masked token), mlm_ppl, and the token and masked-token counts of one text."""
    tokens = encoding.encode_ordinary(text)
    rows, labels = _masked_windows(spec, tokens, salt)
    per_batch = max(1, batch_tokens // spec.seq_len)
    nll, masked = 0.0, 0
    for start in range(0, len(rows), per_batch):
        batch_nll, batch_masked = _mlm_nll(model, spec, rows[start:start + per_batch],
                                           labels[start:start + per_batch], device, precision)
        nll, masked = nll + batch_nll, masked + batch_masked
    if masked == 0:
        raise StageError("heldout: no token was masked; the text is too short for a masked-LM score")
    loss = nll / masked
    return {"mlm_loss": loss, "mlm_ppl": math.exp(min(loss, 700.0)), "tokens": len(tokens), "masked_tokens": masked,
            "bytes": len(text.encode("utf-8")), "windows": len(rows)}


def _masked_windows(spec: ModelSpec, tokens: list[int], salt: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    specials = spec.special_tokens
    masker, chunk = Masker(spec, MLM_PROBABILITY), spec.seq_len - 2
    rows, labels = [], []
    for number, start in enumerate(range(0, len(tokens), chunk)):
        ids = torch.tensor([[specials["[CLS]"], *tokens[start:start + chunk], specials["[SEP]"]]])
        generator = torch.Generator().manual_seed(int(unit_hash(salt, str(number)) * 2**63))
        corrupted, label = masker(ids, generator)
        rows.append(corrupted[0])
        labels.append(label[0])
    return rows, labels


@torch.no_grad()
def _mlm_nll(model: nn.Module, spec: ModelSpec, rows: list[torch.Tensor], labels: list[torch.Tensor],
             device: torch.device, precision: str) -> tuple[float, int]:
    """Summed NLL of the masked tokens over the real vocabulary, and how many there were."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), spec.special_tokens["[PAD]"], dtype=torch.long)
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        ids[i, : len(row)], target[i, : len(row)], mask[i, : len(row)] = row, label, 1
    ids, target, mask = ids.to(device), target.to(device), mask.to(device)
    with autocast(device, precision):
        hidden = model.hidden_states(ids, attention_mask=mask)
        logits = model.mlm_logits(hidden[target != -100])
    wanted = target[target != -100]
    nll = F.cross_entropy(logits[:, : spec.vocab_size].float(), wanted, reduction="sum")
    return float(nll), int(wanted.numel())
