"""One model class per architecture, and what a model costs: its parameters and training FLOPs per token."""
from __future__ import annotations

from torch import nn

from storage.formats import ModelSpec
from tasks.models.bert import BertForPretraining
from tasks.models.gpt import GPT

ARCHITECTURES: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": BertForPretraining}
VOCAB_TABLES = ("wte.weight", "word.weight", "mlm_bias")     # one row (or entry) per padded vocabulary id
POSITION_TABLES = ("wpe.weight", "position.weight")


def build_model(spec: ModelSpec) -> nn.Module:
    """The pretraining model for `spec.arch`, freshly initialised (seed torch first for reproducibility)."""
    return ARCHITECTURES[spec.arch](spec)


def _is(name: str, tables: tuple[str, ...]) -> bool:
    return any(name == table or name.endswith("." + table) for table in tables)


def count_params(model: nn.Module, spec: ModelSpec) -> int:
    """Parameters the model really has: the vocabulary's padding rows are not counted."""
    padding_rows = spec.padded_vocab_size - spec.vocab_size
    padding = sum(padding_rows * p[0].numel() for name, p in model.named_parameters() if _is(name, VOCAB_TABLES))
    return sum(p.numel() for p in model.parameters()) - padding


def flops_per_token(model: nn.Module, spec: ModelSpec) -> float:
    """Training FLOPs per token: 6N (forward + backward over the weights) plus attention, 12 L d T.

    N leaves out position embeddings (a lookup) and, with experts, counts only the top-k share of
    the expert weights, which is what a token passes through (PaLM appendix B; nanoGPT's MFU).
    """
    total = 0.0
    for name, param in model.named_parameters():
        if _is(name, POSITION_TABLES):
            continue
        share = spec.top_k / spec.n_experts if ".experts." in name else 1.0
        total += param.numel() * share
    return 6 * total + 12 * spec.n_layer * spec.d_model * spec.seq_len
