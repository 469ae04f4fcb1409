"""The pretrain stage's config: model shape, optimizer and schedule, batch, launch, logging, sampling.

`PretrainConfig` is what a recipe writes. `ModelSpec` (`storage.formats`) is the resolved model shape
(preset merged with explicit fields, the vocabulary from the shard manifest) that is saved as
`config.json` beside the weights. `TrainerSpec` is the JSON file the stage hands to every torchrun
worker. Importing this module does not import torch (recipes are validated without it).

Every field changes the output, is rejected where it could not, or (for a knob a shared recipe
legitimately carries while another knob switches its feature off) is left out of the fingerprint.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from storage.configbase import StrictModel
from storage.formats import ModelSpec
from tasks.pretrain.presets import get_preset
from tasks.training.config import LoopConfig, OptimConfig

__all__ = ["KernelsConfig", "LoopConfig", "ModelConfig", "MoEConfig", "ModelSpec", "OptimConfig", "PretrainConfig",
           "SampleConfig", "TrainerSpec"]

VOCAB_MULTIPLE = 128                 # the embedding is padded to this multiple (fast matmuls)
BERT_SPECIALS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")
SHAPE_FIELDS = ("n_layer", "n_head", "d_model", "d_mlp", "seq_len")


class MoEConfig(StrictModel):
    """A mixture-of-experts MLP for GPT blocks (top-k routing, Switch-style balancing loss)."""

    n_experts: int = Field(0, ge=0, description="0 keeps the dense MLP")
    top_k: int = Field(2, ge=1)
    aux_loss_weight: float = Field(0.01, ge=0)

    @model_validator(mode="after")
    def _top_k_fits(self) -> "MoEConfig":
        if self.n_experts and self.top_k > self.n_experts:
            raise ValueError(f"model.moe.top_k={self.top_k} exceeds model.moe.n_experts={self.n_experts}")
        if not self.n_experts:
            for name in ("top_k", "aux_loss_weight"):
                if getattr(self, name) != MoEConfig.model_fields[name].default:
                    raise ValueError(f"model.moe.{name}={getattr(self, name)} has no effect without experts; "
                                     "set model.moe.n_experts or remove it")
        return self


class KernelsConfig(StrictModel):
    """Triton kernels for the training hot spots (`kernels`): the same model and loss within float tolerance.

    They run on CUDA (or on CPU under TRITON_INTERPRET=1, Triton's interpreter: slow, for checking);
    anywhere else the PyTorch fallback runs. Off by default until measured on a GPU.
    """

    fused_ce: bool = Field(False, description="LM head + cross-entropy in chunks of rows: no tokens x vocab logits")
    fused_norm: bool = Field(False, description="every LayerNorm by one Triton kernel forward, one backward")

    def enabled(self) -> bool:
        return self.fused_ce or self.fused_norm


class ModelConfig(StrictModel):
    """Architecture and shape; explicit fields override the preset's."""

    # `kernels` changes the numbers only within float tolerance (another order of summation), so one
    # fingerprint names the run with and without them; the output records which ran (model/kernels.json).
    non_output_fields = frozenset({"kernels"})

    arch: Literal["gpt", "bert"] | None = Field(None, description="default: the preset's, else gpt")
    preset: str | None = Field(None, description="default: '<arch>-mini'")
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    d_model: int | None = Field(None, ge=1)
    d_mlp: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    norm: Literal["pre", "post"] | None = Field(None, description="BERT: post (original) by default; GPT: pre only")
    moe: MoEConfig = MoEConfig()
    kernels: KernelsConfig = KernelsConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.preset is not None:
            preset_arch = get_preset(self.preset).arch
            if self.arch is not None and self.arch != preset_arch:
                raise ValueError(f"model.arch={self.arch!r} but model.preset={self.preset!r} is a {preset_arch} preset")
        shape = self.shape()
        if shape["d_model"] % shape["n_head"]:
            raise ValueError(f"model.d_model={shape['d_model']} is not divisible by model.n_head={shape['n_head']}")
        if self.resolved_arch() == "gpt" and self.norm == "post":
            raise ValueError("model.norm='post' is a BERT option; GPT blocks are pre-LayerNorm")
        if self.resolved_arch() == "bert" and self.moe.n_experts:
            raise ValueError("model.moe is a GPT option; set model.moe.n_experts=0 for BERT")
        return self

    def resolved_arch(self) -> Literal["gpt", "bert"]:
        if self.arch is not None:
            return self.arch
        return get_preset(self.preset).arch if self.preset else "gpt"

    def preset_name(self) -> str:
        return self.preset or f"{self.resolved_arch()}-mini"

    def shape(self) -> dict[str, int]:
        """n_layer, n_head, d_model, d_mlp, seq_len: the explicit value, else the preset's."""
        preset = get_preset(self.preset_name())
        return {name: getattr(self, name) or getattr(preset, name) for name in SHAPE_FIELDS}

    def resolve(self, vocab_size: int, special_tokens: dict[str, int], nsp: bool = False) -> ModelSpec:
        """The full shape for a vocabulary of `vocab_size` ids."""
        bert = self.resolved_arch() == "bert"
        return ModelSpec(
            arch=self.resolved_arch(), **self.shape(), vocab_size=vocab_size,
            padded_vocab_size=-(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
            dropout=self.dropout, bias=self.bias, norm=self.norm or ("post" if bert else "pre"),
            layer_norm_eps=1e-12 if bert else 1e-5, nsp=bert and nsp,
            n_experts=self.moe.n_experts, top_k=self.moe.top_k, aux_loss_weight=self.moe.aux_loss_weight,
            special_tokens=dict(special_tokens),
        )


class SampleConfig(StrictModel):
    """Continuations the finished GPT writes to samples.txt (needs the tokenizer stage's output)."""

    prompts: list[str] = ["The ", "First Citizen:\n", "In 1990, "]
    max_new_tokens: int = Field(64, ge=0)
    temperature: float = Field(0.8, gt=0)
    top_k: int | None = Field(40, ge=1)

    @model_validator(mode="after")
    def _prompts_not_empty(self) -> "SampleConfig":
        if any(not prompt for prompt in self.prompts):
            raise ValueError("sample.prompts: a prompt is empty; the model needs at least one token to continue")
        return self


class PretrainConfig(StrictModel):
    """The pretrain stage: a GPT (causal LM) or BERT (MLM [+ NSP]) trained under torchrun."""

    non_output_fields = frozenset({"log_every", "progress", "peak_flops", "rdzv_endpoint"})

    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    sample: SampleConfig = SampleConfig()
    batch_tokens: int = Field(4096, ge=1, description="global batch per optimizer step, in tokens")
    micro_batch: int | None = Field(8, ge=1, description="sequences per rank per forward; None: largest that fits")
    max_steps: int | None = Field(100, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="alternative to max_steps (set max_steps to null)")
    precision: Literal["fp32", "bf16"] = "bf16"
    compile: bool = False
    # World size is an output field: it decides which row groups each rank reads and how the batch
    # splits into micro-batches, so the per-step losses change with it.
    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous (multi-node)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist: Literal["ddp", "fsdp"] = "ddp"
    checkpoint_every: int = Field(50, ge=0, description="steps; 0 saves only the final checkpoint")
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=0, description="steps; 0 turns validation off")
    eval_batches: int = Field(4, ge=1, description="micro-batches per rank per evaluation")
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    nsp: bool = Field(True, description="BERT next-sentence prediction; false gives RoBERTa-style MLM only")
    on_nonfinite: Literal["stop", "skip"] = "stop"
    peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s of one GPU, or of one process's CPU "
                                     "threads, for MFU; None: a table (GPU) or an estimate (CPU)")
    progress: bool = True

    @model_validator(mode="after")
    def _one_budget(self) -> "PretrainConfig":
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of max_steps and max_tokens (the other to null)")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint (host:port reachable from every node)")
        return self

    @model_validator(mode="after")
    def _every_knob_acts(self) -> "PretrainConfig":
        """Knobs that this run could not use are errors, so no two fingerprints name the same model."""
        if self.model.resolved_arch() == "gpt":
            if self.mlm_probability != PretrainConfig.model_fields["mlm_probability"].default:
                raise ValueError(f"mlm_probability={self.mlm_probability} is a BERT option (masked-LM); "
                                 "a GPT run has no masking: remove it")
            if not self.nsp:
                raise ValueError("nsp=false is a BERT option (next-sentence prediction); GPT has none: remove it")
        if self.dist == "fsdp" and self.world_size == 1:
            raise ValueError("dist='fsdp' shards the model across processes; with one process it does nothing: "
                             "use dist='ddp' or raise nproc_per_node")
        return self

    def output_fields(self) -> dict[str, Any]:
        """The fingerprinted fields, less those whose feature this run switches off.

        A recipe shared by a GPT and a BERT run (`--set pretrain.model.arch=bert`), or one with
        evaluation or periodic checkpoints turned off by a `--set`, keeps its `sample`,
        `eval_batches` and `keep_last`; they change nothing then, so they do not enter the fingerprint.
        """
        data = super().output_fields()
        idle = {"sample": self.model.resolved_arch() == "bert", "eval_batches": not self.eval_every,
                "keep_last": not self.checkpoint_every}
        return {name: value for name, value in data.items() if not idle.get(name)}

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def loop_config(self, run_dir: str, seed: int, sequences_per_rank: int, max_steps: int,
                    mlflow_tracking_uri: str | None = None, mlflow_run_id: str | None = None) -> LoopConfig:
        """What the shared training loop is told about this run."""
        fields = ("optim", "micro_batch", "precision", "compile", "device", "dist", "checkpoint_every", "keep_last",
                  "log_every", "eval_every", "eval_batches", "on_nonfinite", "peak_flops", "progress")
        return LoopConfig(name="pretrain", run_dir=run_dir, seed=seed, max_steps=max_steps,
                          sequences_per_rank=sequences_per_rank, mlflow_tracking_uri=mlflow_tracking_uri,
                          mlflow_run_id=mlflow_run_id, **{name: getattr(self, name) for name in fields})


class TrainerSpec(StrictModel):
    """Everything a torchrun worker needs, written by the stage as JSON (no secrets, no environment)."""

    loop: LoopConfig
    model: ModelSpec
    shard_dir: str
    mlm_probability: float            # the masked-LM objective's
    sample: SampleConfig              # the causal-LM objective's samples.txt
    tokenizer_dir: str | None = None
    kernels: KernelsConfig = KernelsConfig()
