"""How a trained model leaves lmforge: a Hugging Face-format folder, and text generated from it.

    export(stage_dir, out)                # GPT -> GPT2LMHeadModel, BERT -> BertForPreTraining/BertForMaskedLM
    generate(stage_dir, prompts, Sampling(max_new_tokens=64), sys.stdout)    # KV-cached, streamed

`stage_dir` is a pretrain output (or its `model/`, or a `checkpoints/step-N/`), or a finetune output's
task folder (a fine-tuned GPT is used as its language model); its tokenizer is found through the
workspace's `_SUCCESS.json` records, or named with `tokenizer=`.
"""
from __future__ import annotations

from pathlib import Path

from storage.stage import StageError
from tasks.export.generate import Completion, Generator, Sampling, generate, read_prompts
from tasks.export.hf import ExportError, export_hf, unsupported
from tasks.export.source import ModelSource, find_tokenizer, resolve_source

FORMATS = ("hf",)


def export(stage_dir: Path | str, out: Path | str, format: str = "hf", tokenizer: Path | str | None = None) -> Path:
    """Writes the model under `stage_dir` to `out` in `format` (only `hf` so far)."""
    if format not in FORMATS:
        raise StageError(f"--format {format!r}: lmforge exports {', '.join(FORMATS)}")
    return export_hf(resolve_source(stage_dir, tokenizer), out)


__all__ = ["Completion", "ExportError", "FORMATS", "Generator", "ModelSource", "Sampling", "export", "export_hf",
           "find_tokenizer", "generate", "read_prompts", "resolve_source", "unsupported"]
