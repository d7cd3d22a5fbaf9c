"""Training: corpus preparation (`neoxja prepare`) and the training loop (`neoxja train`).

Modules, top-down:
  prepare     corpus files -> token files (train.bin / val.bin) + manifest.json
  data        memory-mapped token files -> deterministic, resumable batches
  optim       AdamW parameter groups and the warm-up + cosine learning-rate schedule
  checkpoint  atomic, keep-last-K checkpoints (plain or torch.distributed.checkpoint)
  distributed process-group set-up, DDP / FSDP2 wrapping
  metrics     metrics.jsonl and the loss-curve PNG
  memory      glibc keeps freed blocks, so steps do not fault fresh pages in (`neoxja train` sets it)
  loop        the training loop itself
  cli         argument parsing for `neoxja train`

Nothing here is imported by the model; it imports the model.
"""
