"""pretrain: GPT (causal LM) or BERT (MLM, optional NSP) trained from token shards under torchrun.

Declared here without importing torch; `tasks.pretrain.stage.run` checks the shards, launches the
workers and collects the model (`model/`: `model.safetensors` + `config.json`, a `storage.formats.ModelSpec`).
"""
from __future__ import annotations

from storage.stage import Stage, always, deferred
from tasks.pretrain.config import PretrainConfig

VERSION = "1"

# The seed always matters: it draws the initial weights, the data order and the dropout masks.
STAGE = Stage(name="pretrain", version=VERSION, config=PretrainConfig, run=deferred("tasks.pretrain.stage:run"),
              reads=("shard", "tokenizer"), seed_matters=always,
              headline=("final_train_loss", "final_val_loss", "final_val_ppl", "tokens_trained", "epochs",
                        "tokens_per_s"),
              # timings: the training log, and the run summary inside each checkpoint's trainer state
              digest_ignores=("metrics.jsonl", "checkpoints/*/trainer_state.pt"))
run = STAGE.run
__all__ = ["STAGE", "VERSION", "PretrainConfig", "run"]
