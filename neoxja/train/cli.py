"""`neoxja train`: pre-train or fine-tune on data written by `neoxja prepare`.

One process:       neoxja train --data DATA --out OUT --model-config cfg.json --steps 1000 ...
A checkpoint:      neoxja train export-checkpoint OUT/checkpoints/step_00000100 MODEL_DIR  (a model directory)
Many (one node):   torchrun --nproc_per_node 8 -m neoxja train ... [--fsdp]
Many nodes:        torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
                            --nproc_per_node 8 -m neoxja train ...
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch


def _at_least(kind, low, strict: bool, high=None):
    """An argparse type: a finite `kind` above `low` (or equal to it unless strict), below `high` if given."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < low or (strict and value == low) or (high is not None and value >= high):
            bound = f"> {low}" if strict else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}"
                                             f"{f' and < {high}' if high is not None else ''}, got {text}")
        return value

    return parse


def _positive(kind):
    return _at_least(kind, 0, strict=True)


def _non_negative(kind):
    return _at_least(kind, 0, strict=False)


def _device(text: str) -> str:
    """A device this machine has: checked here, not after the data and the model are loaded."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available (no GPU, or a CPU build of PyTorch)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neoxja train", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="directory written by `neoxja prepare`")
    p.add_argument("--out", required=True, help="output directory (metrics, checkpoints, final model)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-config", metavar="JSON", help="new model: config.json file or inline JSON object")
    model.add_argument("--init-from", metavar="DIR_OR_HUB_ID", help="fine-tune a pretrained model")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="with --init-from: train even though the data was prepared with another tokenizer than the "
                        "model's (its token ids then mean other text to the model; default: refuse)")
    p.add_argument("--steps", type=_positive(int), required=True, help="optimizer steps in total")
    p.add_argument("--batch-size", type=_positive(int), required=True, help="sequences per micro-batch per process")
    p.add_argument("--seq-len", type=_positive(int), required=True, help="tokens per sequence")
    p.add_argument("--grad-accum", type=_positive(int), default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=_positive(float), default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--min-lr", type=_non_negative(float), default=None, help="final learning rate (default lr / 10)")
    p.add_argument("--warmup-steps", type=_non_negative(int), default=None,
                   help="linear warm-up steps (default min(100, steps // 10))")
    p.add_argument("--weight-decay", type=_non_negative(float), default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--grad-clip", type=_non_negative(float), default=1.0, help="max gradient norm; 0 disables (default 1.0)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="autocast dtype, weights stay float32; auto (the default): bfloat16 on a CPU with AMX-BF16 "
                        "or AVX512-BF16 and on GPUs that support it, else float32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations per layer in backward (default off)")
    p.add_argument("--eval-every", type=_non_negative(int), default=0,
                   help="validate every N steps (default 0: only at the end, if the validation split allows)")
    p.add_argument("--eval-steps", type=_positive(int), default=20, help="validation batches per evaluation (default 20)")
    p.add_argument("--save-every", type=_non_negative(int), default=500, help="checkpoint every N steps (0: never; default 500)")
    p.add_argument("--keep", type=_positive(int), default=3, help="checkpoints kept (default 3)")
    p.add_argument("--seed", type=_at_least(int, 0, strict=False, high=2**63), default=1337,
                   help="seed of the initial weights, the data order and dropout (default 1337)")
    p.add_argument("--resume", metavar="auto|PATH", default=None,
                   help="continue from the newest checkpoint in OUT (auto) or from PATH (default: a fresh run); "
                        "what may change on resume: docs/training.md")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per layer; default off: DDP under torchrun)")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda (each process its own GPU: cuda:LOCAL_RANK), cuda:N "
                        "(default: cuda:LOCAL_RANK if available, else cpu)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.min_lr > args.lr:
        parser.error(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr})")
    if args.warmup_steps is None:
        args.warmup_steps = min(100, args.steps // 10)
    if args.warmup_steps > args.steps:
        parser.error(f"--warmup-steps ({args.warmup_steps}) must not exceed --steps ({args.steps})")
    args.dtype_reason = "--dtype"
    if args.dtype == "auto":
        from neoxja.hardware import dtype_choice

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # what the loop will pick
        dtype, reason = dtype_choice(device)
        args.dtype, args.dtype_reason = str(dtype).removeprefix("torch."), f"auto: {reason}"
    return args


def export_main(argv: list[str]) -> int:
    """`neoxja train export-checkpoint CHECKPOINT OUT`."""
    p = argparse.ArgumentParser(prog="neoxja train export-checkpoint",
                                description="Make a model directory (Hugging Face layout, loadable by `neoxja "
                                            "generate --model OUT` and transformers) of a training checkpoint.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory, e.g. runs/x/checkpoints/step_00000100")
    p.add_argument("out", metavar="OUT", help="the model directory to write (new or empty)")
    args = p.parse_args(argv)
    from neoxja.train.checkpoint import CheckpointError, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except CheckpointError as err:
        print(f"neoxja train export-checkpoint: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: use it with `neoxja generate --model {out}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    from neoxja.train.checkpoint import CheckpointError
    from neoxja.train.loop import TrainError, train
    from neoxja.train.memory import retain_freed_memory

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export-checkpoint"]:
        return export_main(argv[1:])
    args = parse_args(argv)
    retain_freed_memory()  # glibc: steps reuse freed blocks instead of faulting fresh pages in (train/memory.py)
    if os.environ.get("RANK", "0") == "0":
        master = "" if args.dtype == "float32" else " autocast, float32 master weights"
        print(f"dtype {args.dtype}{master} ({args.dtype_reason})")  # stdout, with the run's other progress; stderr stays for errors
    try:
        train(args)
    except (TrainError, CheckpointError) as err:
        print(f"neoxja train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nneoxja train: interrupted; {_where_to_resume(args)}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 -- the environment (a full disk, a read-only --out), else re-raised
        from neoxja.train.failures import describe

        message = describe(err, args.out)
        if message is None:
            raise
        print(f"neoxja train: error: {message}", file=sys.stderr)
        return 1
    return 0


def _where_to_resume(args: argparse.Namespace) -> str:
    """Where the last checkpoint is and how to continue from it (after Ctrl-C)."""
    from pathlib import Path

    from neoxja.train.checkpoint import list_checkpoints

    found = list_checkpoints(Path(args.out) / "checkpoints")
    if not found:
        return (f"no checkpoint was saved in {Path(args.out) / 'checkpoints'} (--save-every {args.save_every}), "
                "so there is nothing to resume: run the command again to start over")
    step, path = found[-1]
    return f"the last checkpoint is {path} (step {step}): continue with the same command and --resume auto"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
