"""The training loop every trainable stage shares (pretrain now, finetune next), and what it needs.

    loop.py        Trainer: optimizer, LR schedule, accumulation, clipping, checkpoints and exact
                   resume, DDP/FSDP2, non-finite steps, micro-batch probing, metrics and MLflow
    objective.py   Objective: what one task family contributes (model, batches, inputs, loss)
    config.py      LoopConfig and OptimConfig (pydantic, torch-free: recipes validate without torch)
    launch.py      torchrun: the command, running it, a worker's entry point and its failure report
    checkpoint.py, runtime.py, reporting.py, optim.py: the loop's parts

Nothing here imports torch at package import, so `tasks.training.config` stays cheap.
"""
