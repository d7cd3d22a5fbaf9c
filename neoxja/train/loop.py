"""The training loop behind `neoxja train` (one process, DDP or FSDP2 under torchrun).

One optimizer step: grad_accum micro-batches (each a slice of the global batch for this rank),
forward under autocast, backward (gradients synchronised on the last micro-batch only), gradient
clipping, AdamW step, learning-rate step. Everything a resumed run needs to continue bit for bit is
in the checkpoint: model, optimizer, scheduler, grad scaler, every rank's RNG, and the data position
(samples consumed; the batch order is a pure function of it, see data.py).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import shutil
import time
from argparse import Namespace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from neoxja.config import GPTNeoXJapaneseConfig, read_config_json
from neoxja.model import GPTNeoXJapaneseForCausalLM
from neoxja.train import checkpoint as ckpt
from neoxja.train import distributed as dist_utils
from neoxja.train.data import DataError, DistributedBatches, TokenWindows, load_manifest, open_tokens
from neoxja.train.metrics import MetricsLog, plot_loss_curve, read_metrics
from neoxja.train.optim import make_optimizer, make_scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD_CHUNK_TOKENS = 256  # rows of logits alive at once when the LM head is checkpointed


class TrainError(ValueError):
    """Arguments or inputs that make training impossible; the message says which and why."""


# ----------------------------------------------------------------------------- model and loss


class CausalLMLoss(torch.nn.Module):
    """Mean next-token cross-entropy of a GPTNeoXJapaneseForCausalLM; the unit DDP / FSDP wrap.

    With `checkpoint_head`, the LM head and loss run in checkpointed chunks of HEAD_CHUNK_TOKENS
    positions, so the (tokens, vocab) logits never exist at once (they dominate memory at long
    sequence lengths once the layers are checkpointed too).
    """

    def __init__(self, lm: GPTNeoXJapaneseForCausalLM, checkpoint_head: bool = False):
        super().__init__()
        self.lm = lm
        self.checkpoint_head = checkpoint_head

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.checkpoint_head:
            logits = self.lm(input_ids, use_cache=False).logits  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        hidden = self.lm.gpt_neox_japanese(input_ids, use_cache=False).last_hidden_state  # (B, T, C)
        hidden, targets = hidden.flatten(0, 1), targets.flatten()  # (B*T, C), (B*T,)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.size(0), HEAD_CHUNK_TOKENS):
            rows = slice(start, start + HEAD_CHUNK_TOKENS)
            total = total + checkpoint(self._summed_loss, hidden[rows], targets[rows], use_reentrant=False)
        return total / (targets != -100).sum()  # the mean over counted targets, as F.cross_entropy takes it

    def _summed_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm.embed_out(hidden).float(), targets, reduction="sum")


def checkpoint_layers(layers: torch.nn.ModuleList) -> None:
    """Activation checkpointing per transformer layer, applied from outside the model.

    Each layer's forward runs under torch.utils.checkpoint (non-reentrant, RNG state preserved so
    dropout is replayed identically); only its input is kept, the rest is recomputed in backward.
    Parameter names are unchanged, so checkpoints and exports are unaffected.
    """
    for layer in layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)


def _read_model_config(spec: str) -> dict:
    """--model-config: a JSON file or an inline JSON object; every key must be one a config knows."""
    try:
        return read_config_json(spec, strict=True)
    except ValueError as err:
        raise TrainError(f"--model-config: {err}") from None


def check_tokenizer(args: Namespace, data_dir: Path, manifest: dict) -> None:
    """--init-from: the data must have been tokenized with the model's own tokenizer (same content)."""
    from neoxja.hub import ModelNotFoundError
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer
    from neoxja.train.prepare import tokenizer_fingerprint

    try:
        model_tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(args.init_from)
    except ModelNotFoundError as err:
        raise TrainError(f"--init-from {args.init_from}: cannot load it: {err}") from None
    except (OSError, ValueError) as err:
        raise TrainError(f"--init-from {args.init_from}: no tokenizer to compare with the data's ({err}); "
                         "pass --allow-tokenizer-mismatch if the data was surely tokenized for this model") from None
    recorded = manifest["tokenizer"]
    data_print = recorded.get("fingerprint")
    if data_print is None:  # prepared before the manifest recorded it: read the copy kept with the data
        try:
            data_print = tokenizer_fingerprint(GPTNeoXJapaneseTokenizer.from_pretrained(data_dir / recorded["dir"]))
        except (OSError, ValueError) as err:
            raise TrainError(f"{data_dir}: cannot read the tokenizer the data was prepared with: {err}") from None
    if data_print != tokenizer_fingerprint(model_tokenizer):
        raise TrainError(
            f"the data in {data_dir} was prepared with another tokenizer ({recorded.get('source')}, "
            f"{recorded['vocab_size']} ids) than the model --init-from {args.init_from} has ({len(model_tokenizer)} "
            f"ids, a different vocabulary): its token ids would mean other text to the model. Prepare the data "
            f"with `neoxja prepare --tokenizer {args.init_from} ...`, or pass --allow-tokenizer-mismatch if you "
            f"mean it")


def build_model(args: Namespace, manifest: dict) -> GPTNeoXJapaneseForCausalLM:
    """A fresh model from --model-config, or a pretrained one from --init-from, in float32."""
    if args.init_from:
        try:
            model = GPTNeoXJapaneseForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        except (OSError, ValueError) as err:  # missing files, unknown hub id, offline without a cache
            raise TrainError(f"--init-from {args.init_from}: cannot load it: {err}") from None
    else:
        tokenizer = manifest["tokenizer"]
        config = {  # defaults follow the data's tokenizer; the JSON overrides them
            "vocab_size": tokenizer["vocab_size"],
            "bos_token_id": tokenizer.get("bos_token_id"),
            "eos_token_id": tokenizer.get("eos_token_id"),
            **_read_model_config(args.model_config),
        }
        try:
            model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig.from_dict(config))
        except (TypeError, ValueError) as err:
            raise TrainError(f"--model-config: {err}") from None
    vocab = manifest["tokenizer"]["vocab_size"]
    if model.config.vocab_size < vocab:
        raise TrainError(
            f"the model's vocab_size ({model.config.vocab_size}) is smaller than the data's tokenizer ({vocab})"
        )
    if args.seq_len > model.config.max_position_embeddings:
        raise TrainError(
            f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
            f"({model.config.max_position_embeddings})"
        )
    return model.float()


# ----------------------------------------------------------------------------- the run


class RunLock:
    """An exclusive OS lock (flock) on OUT/.lock, held by rank 0 for the whole run.

    The kernel releases it however the process ends (exception, Ctrl-C, SIGKILL). The file records who
    holds it, so that a second run into the same OUT is refused at once with a message naming the first.
    """

    NAME = ".lock"

    def __init__(self, out: Path, env: dist_utils.DistEnv):
        self.out, self.env, self._file = out, env, None

    def acquire(self) -> None:
        holder = None
        if self.env.is_main:
            holder = self._try_lock()
        refused = torch.tensor(0.0 if holder is None else 1.0, device=self.env.device)
        if dist_utils.mean_over_ranks(refused, self.env).item() > 0:  # every rank stops, not only rank 0
            raise TrainError(f"{self.out} is in use by another training run ({holder or 'see rank 0'}); wait for it "
                             "to finish, or choose another --out")

    def _try_lock(self) -> str | None:
        """None when locked; else a description of the run that holds the lock."""
        import fcntl
        import os
        import socket
        import sys

        self.out.mkdir(parents=True, exist_ok=True)
        f = open(self.out / self.NAME, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                info = json.loads(f.read())
                holder = (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                          f"{' '.join(info['command'])}")
            except (ValueError, KeyError, TypeError):
                holder = f"it holds {self.out / self.NAME}"
            f.close()
            return holder
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": ["neoxja", *sys.argv[1:]]}))
        f.flush()
        self._file = f
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def train(args: Namespace) -> dict:
    """Run training as the arguments say; returns a summary. Collective under torchrun."""
    env = dist_utils.setup(args.device, need_group=args.fsdp)
    lock = RunLock(Path(args.out), env)
    try:
        return _train(args, env, lock)
    finally:
        lock.release()
        # the DDP/FSDP-wrapped model sits in reference cycles (autograd hooks) and holds the process group and
        # its last collectives' work; collected here, they go while the interpreter is whole. Left to the
        # interpreter's exit, gloo's worker threads met a half-torn-down interpreter: "terminate called without
        # an active exception", SIGABRT, in about 2 of 5 full test runs (never in the test file alone)
        gc.collect()
        dist_utils.teardown(env)


def _train(args: Namespace, env: dist_utils.DistEnv, lock: RunLock) -> dict:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; give a directory")
    data_dir = Path(args.data)
    try:
        manifest = load_manifest(data_dir)
        train_tokens = open_tokens(data_dir, "train", manifest)
        val_tokens = open_tokens(data_dir, "val", manifest)
    except DataError as err:
        raise TrainError(str(err)) from None
    if args.init_from and not getattr(args, "allow_tokenizer_mismatch", False):
        check_tokenizer(args, data_dir, manifest)
    lock.acquire()  # before anything in OUT is read or written
    ckpt_root = out / "checkpoints"

    resume_path = None
    if args.resume == "auto":
        resume_path = ckpt.latest_checkpoint(ckpt_root)
    elif args.resume:
        resume_path = Path(args.resume)
        ckpt.read_meta(resume_path)  # fail early with a clear message
    elif ckpt.list_checkpoints(ckpt_root):  # a fresh run would mix its checkpoints with these
        raise TrainError(f"{ckpt_root} holds checkpoints of an earlier run: continue it with --resume auto, "
                         "or choose another --out")
    if args.resume == "auto" and resume_path is None and env.is_main:
        print(f"--resume auto: no checkpoint in {ckpt_root}, starting from scratch")
    meta = ckpt.read_meta(resume_path) if resume_path else None
    if meta and not isinstance(meta.get("args"), dict):
        raise TrainError(f"{resume_path}/meta.json: not the metadata neoxja train writes (no training arguments)")
    resume_changes = check_resume(args, meta, resume_path, manifest) if meta else {}

    # Identical initial weights on every rank (FSDP shards them, DDP broadcasts rank 0's anyway).
    torch.manual_seed(args.seed)
    model = build_model(args, manifest).to(env.device)
    layers = model.gpt_neox_japanese.layers
    if args.grad_checkpointing:
        checkpoint_layers(layers)
    loss_module = CausalLMLoss(model, checkpoint_head=args.grad_checkpointing)
    if args.fsdp:
        train_module = dist_utils.shard_fsdp(loss_module, layers)
    elif env.world_size > 1:
        train_module = dist_utils.wrap_ddp(loss_module, env)
    else:
        train_module = loss_module
    torch.manual_seed(args.seed + env.rank)  # dropout: a different stream per rank

    dtype = DTYPES[args.dtype]
    if args.fsdp and dtype == torch.float16:
        # Each rank sees only its gradient shards, so an overflow must be agreed on by all ranks:
        # ShardedGradScaler does that, but its found-inf flag does not fit fused AdamW's kernel.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(env.device.type)
        optimizer = make_optimizer(loss_module, args.lr, args.weight_decay, device=env.device, fused=False)
    else:
        scaler = torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16)
        optimizer = make_optimizer(loss_module, args.lr, args.weight_decay, device=env.device)
    scheduler = make_scheduler(optimizer, args.lr, args.min_lr, args.warmup_steps, args.steps)

    windows = TokenWindows(train_tokens, args.seq_len, seed=args.seed, shuffle=True)
    if windows.num_windows == 0:
        raise TrainError(f"the training split has {len(train_tokens)} tokens, "
                         f"fewer than --seq-len + 1 = {args.seq_len + 1}")
    batches = DistributedBatches(windows, args.batch_size, env.rank, env.world_size)
    global_batch = batches.global_batch_size
    eval_batches = _eval_batches(args, val_tokens, env, global_batch, len(train_tokens))

    step, samples_seen, resumed = 0, 0, []
    if resume_path:
        meta, trainer_state = ckpt.load_checkpoint(resume_path, train_module, optimizer, env, args.fsdp)
        step, samples_seen = meta["step"], meta["samples_seen"]
        # The schedule is a pure function of the step and of --lr, --min-lr, --warmup-steps, --steps: it is
        # rebuilt from this run's values (the checkpoint's scheduler state holds nothing else).
        apply_schedule_at(scheduler, step)
        for group in optimizer.param_groups:  # weight decay: this run's value (matrices only, as at the start)
            if group["weight_decay"]:
                group["weight_decay"] = args.weight_decay
        if scaler.is_enabled() and trainer_state["scaler"]:  # empty when the run was not float16: start afresh
            scaler.load_state_dict(trainer_state["scaler"])
        resumed = list(meta.get("resumed", []))
        if resume_changes:
            resumed.append({"step": step, "changed": {k: list(v) for k, v in resume_changes.items()}})
        if env.is_main:
            print(f"resumed from {resume_path} at step {step}")
            for key, (old, new) in resume_changes.items():
                print(f"  --{key.replace('_', '-')} {old} -> {new}: {RESUME_APPLIED[key]}")
    if env.is_main:
        ckpt.clean_partial(ckpt_root)
        out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if resume_path else None)
    dist_utils.barrier(env)

    autocast = partial(torch.autocast, env.device.type, dtype=dtype, enabled=dtype != torch.float32)
    tokens_per_step = global_batch * args.grad_accum * args.seq_len
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=step, unit="step", disable=not env.is_main, dynamic_ncols=True)
    train_module.train()
    last = {}
    if resume_path:  # the checkpoint's own line, for the summary when nothing is left to train
        last = next((r for r in reversed(read_metrics(out / "metrics.jsonl")) if r.get("step") == step), {})
        if step == args.steps and env.is_main:
            print(f"nothing left to train: {resume_path} is at --steps {args.steps}")
    while step < args.steps:
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=env.device)
        for micro in range(args.grad_accum):
            x, y = batches(samples_seen)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            samples_seen += global_batch
            sync = micro == args.grad_accum - 1
            # DDP: all-reduce gradients on the last micro-batch only
            no_sync = train_module.no_sync if not sync and hasattr(train_module, "no_sync") else contextlib.nullcontext
            if args.fsdp:  # FSDP2: reduce-scatter gradients on the last micro-batch only
                train_module.set_requires_gradient_sync(sync)
            with no_sync():
                with autocast():
                    loss = train_module(x, y) / args.grad_accum
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        grad_norm = _clip_gradients(loss_module, optimizer, scaler, args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        loss_value = dist_utils.mean_over_ranks(loss_sum, env).item()
        elapsed = time.perf_counter() - t0

        if not math.isfinite(loss_value) and dtype != torch.float16:
            raise TrainError(f"the loss became {loss_value} at step {step}; lower --lr or check the data")
        # tokens actually consumed: every sample so far (whatever the batch size of earlier runs) x seq_len
        record = {"step": step, "loss": loss_value, "lr": lr, "tokens": samples_seen * args.seq_len,
                  "tokens_per_s": tokens_per_step / elapsed}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        eval_due = (args.eval_every and step % args.eval_every == 0) or step == args.steps
        if eval_batches and eval_due:
            record["val_loss"] = evaluate(train_module, eval_batches, autocast, env)
        if env.is_main:
            metrics.write(record)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}",
                            refresh=False)
            bar.update()
        last = record
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            ckpt.save_checkpoint(
                ckpt_root, step,
                {"samples_seen": samples_seen, "args": _saved_args(args), "data": _data_identity(manifest),
                 "resumed": resumed},
                train_module, optimizer,
                {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
                env, args.fsdp, args.keep,
                write_model_files=partial(write_model_files, model.config, data_dir / manifest["tokenizer"]["dir"]),
            )
    bar.close()

    export_final(train_module, model, out / "final", data_dir / manifest["tokenizer"]["dir"], env, args.fsdp)
    if env.is_main:
        metrics.close()
        plot_loss_curve(out / "metrics.jsonl", out / "loss.png")
        print(f"done: step {step}, loss {last.get('loss', float('nan')):.4f}; model in {out / 'final'}")
    return {"step": step, **last}


# The resume rule. A resumed run continues the checkpoint's model, optimizer state, RNG and data position.
# These arguments may differ from the checkpoint's; the new value applies from the checkpoint's step on
# (said at the start, and recorded in each later checkpoint's meta.json: "args" and "resumed"):
RESUME_APPLIED = {
    "steps": "the new total; the learning-rate schedule is that of the new total from here on",
    "lr": "the schedule's peak, from here on",
    "min_lr": "the schedule's floor, from here on",
    "warmup_steps": "the schedule's warm-up, from here on",
    "batch_size": "samples per step from here on; the data continues at the first sample not yet seen",
    "grad_accum": "samples per step from here on; the data continues at the first sample not yet seen",
    "weight_decay": "applied from here on",
    "grad_clip": "applied from here on",
    "dtype": "autocast from here on (a float16 gradient scaler starts afresh)",
    "grad_checkpointing": "memory only: the same numbers",
    "eval_every": "applied from here on", "eval_steps": "applied from here on",
    "save_every": "applied from here on", "keep": "applied from here on", "device": "applied from here on",
}
# These may not: they define the data stream or the model, which the checkpoint continues.
RESUME_FIXED = {
    "seq_len": "the data position counts windows of this length",
    "seed": "the data order and dropout streams come from it",
    "model_config": "the checkpoint holds this model",
    "init_from": "the checkpoint holds this model",
}


def check_resume(args: Namespace, meta: dict, resume_path: Path, manifest: dict) -> dict:
    """Refuse what may not change on resume (RESUME_FIXED, other data, fewer steps than done); return the
    arguments that changed as {name: (checkpoint's value, this run's)}."""
    saved = meta["args"]
    for key, why in RESUME_FIXED.items():
        if key in saved and _normalized(saved[key]) != _normalized(getattr(args, key)):
            old = "none" if saved[key] is None else saved[key]
            raise TrainError(f"{resume_path} was trained with --{key.replace('_', '-')} {old}; resume with the same "
                             f"value (got {getattr(args, key)}): {why}")
    data, now = meta.get("data"), _data_identity(manifest)
    if data is not None and (data["train_tokens"] != now["train_tokens"]
                             or None not in (data["tokenizer"], now["tokenizer"]) and data["tokenizer"] != now["tokenizer"]):
        raise TrainError(f"{resume_path} was trained on other data ({data['train_tokens']:,} training tokens) than "
                         f"--data {args.data} ({manifest['train']['tokens']:,}): resume with the same prepared data")
    if args.steps < meta["step"]:
        raise TrainError(f"--steps {args.steps} is below the step of {resume_path} ({meta['step']}): give --steps "
                         f"{meta['step']} or more to continue it")
    return {key: (saved[key], getattr(args, key)) for key in RESUME_APPLIED
            if key in saved and saved[key] != getattr(args, key)}


def _normalized(value):
    """An inline JSON --model-config compares by content, not by spelling."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def apply_schedule_at(scheduler, step: int) -> None:
    """Put a fresh LambdaLR at `step`: the learning rate it would have set there after `step` steps."""
    scheduler.last_epoch = step
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(step)  # what LambdaLR.step() computes
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _data_identity(manifest: dict) -> dict:
    return {"train_tokens": manifest["train"]["tokens"], "tokenizer": manifest["tokenizer"].get("fingerprint")}


def _saved_args(args: Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def _clip_gradients(module, optimizer, scaler, max_norm: float) -> float | None:
    """Clip the global gradient norm (across ranks under FSDP); returns it before clipping."""
    if not max_norm:
        return None
    scaler.unscale_(optimizer)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):  # a DTensor under FSDP2: the norm of the whole model
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(module.parameters(), max_norm, total)
    return total.item()


def _eval_batches(args: Namespace, val_tokens, env, global_batch: int, train_tokens: int) -> list | None:
    """The validation batches (this rank's rows): the first windows of the split, in file order."""
    windows = TokenWindows(val_tokens, args.seq_len, shuffle=False)
    count = min(args.eval_steps, windows.num_windows // global_batch)
    if count == 0:
        message = (f"the validation split ({len(val_tokens)} tokens) holds fewer than one batch of "
                   f"{global_batch} x {args.seq_len + 1} tokens")
        if args.eval_every:
            needed = global_batch * args.seq_len + 1
            total = len(val_tokens) + train_tokens
            fraction = min(0.5, math.ceil(100 * 1.5 * needed / max(total, 1)) / 100)
            raise TrainError(message + f"; prepare the data again with --val-fraction {fraction} (or --val-input "
                             f"FILE) for at least {needed} tokens, evaluate smaller batches (--batch-size, --seq-len), "
                             "or drop --eval-every")
        return None  # no evaluation was asked for; the final one is skipped
    batches = DistributedBatches(windows, args.batch_size, env.rank, env.world_size)
    return [batches(i * global_batch) for i in range(count)]


@torch.no_grad()
def evaluate(train_module, eval_batches, autocast, env) -> float:
    train_module.eval()
    total = torch.zeros((), device=env.device)
    for x, y in eval_batches:
        with autocast():
            total += train_module(x.to(env.device), y.to(env.device)).float()
    train_module.train()
    return dist_utils.mean_over_ranks(total / len(eval_batches), env).item()


def copy_tokenizer(tokenizer_dir: Path, directory: Path) -> None:
    for path in sorted(Path(tokenizer_dir).iterdir()):
        if path.is_file():
            shutil.copy2(path, directory / path.name)


def write_model_files(config: GPTNeoXJapaneseConfig, tokenizer_dir: Path, directory: Path) -> None:
    """config.json and the tokenizer's files, which make a checkpoint exportable on its own."""
    config.save_pretrained(directory)
    copy_tokenizer(tokenizer_dir, directory)


def export_final(train_module, model, final_dir: Path, tokenizer_dir: Path, env, fsdp: bool) -> None:
    """The trained model in the Hugging Face layout (config.json, safetensors, tokenizer files).

    Written aside and renamed into place. Under FSDP the full weights are gathered to rank 0 first.
    """
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(train_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_main:
            export_model = GPTNeoXJapaneseForCausalLM(model.config)
            export_model.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()})
    else:
        export_model = model
    if env.is_main:
        tmp = final_dir.with_name(final_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        export_model.save_pretrained(tmp)
        copy_tokenizer(tokenizer_dir, tmp)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        tmp.replace(final_dir)
    dist_utils.barrier(env)
