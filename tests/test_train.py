"""`neoxja train` on one process: schedule, parameter groups, data order, checkpoints, exact resume
after SIGKILL, mixed precision, activation checkpointing, export, bad input.

The helpers at the top are shared with test_train_distributed.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- helpers

SENTENCES = [
    "吾輩は猫である。", "名前はまだ無い。", "どこで生れたかとんと見当がつかぬ。",
    "国境の長いトンネルを抜けると雪国であった。", "夜の底が白くなった。", "メロスは激怒した。",
    "山路を登りながら、こう考えた。", "智に働けば角が立つ。", "情に棹させば流される。",
    "春はあけぼの。", "やうやう白くなりゆく山ぎは、少し明かりて。", "祇園精舎の鐘の声、諸行無常の響きあり。",
]

# tiny, so that a step takes milliseconds; vocab_size comes from the data's tokenizer
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_multiple_size": 2,
        "max_position_embeddings": 64, "attention_dropout": 0.0, "hidden_dropout": 0.0}


def write_corpus(path: Path, documents: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(documents):
            text = "".join(rng.choice(SENTENCES) for _ in range(rng.randint(5, 30)))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def prepare_data(tmp: Path, tokenizer_dir: Path) -> Path:
    from neoxja.train.prepare import main

    out = tmp / "data"
    assert main(["--tokenizer", str(tokenizer_dir), "--out", str(out), "--num-proc", "1", "--val-fraction", "0.1",
                 str(write_corpus(tmp / "corpus.jsonl"))]) == 0
    return out
def subprocess_env() -> dict:
    # one thread per process: on a shared 2-core machine more threads only contend
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def neoxja_command(*args) -> list[str]:
    return [sys.executable, "-m", "neoxja", *map(str, args)]


def torchrun_command(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--standalone", "-m", "neoxja", *map(str, args)]


def start(command: list[str]) -> subprocess.Popen:
    """Start a command in the background (independent runs overlap: one process per core)."""
    return subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0 or not check, f"{' '.join(process.args)}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return result


def run(command: list[str], timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    return finish(start(command), timeout, check)


def losses(out: Path) -> list[float]:
    from neoxja.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def train_args(data: Path, out: Path, config: dict = TINY, **options) -> list[str]:
    """Arguments of `neoxja train` for a tiny run; options override (name_with_underscores=value)."""
    # float32 unless a test asks otherwise: --dtype auto (the default) is bfloat16 on CPUs with AMX or AVX512-BF16,
    # and these tests compare runs at float32's precision
    values = {"batch_size": 4, "seq_len": 16, "steps": 6, "save_every": 0, "lr": 3e-3, "dtype": "float32", **options}
    values.setdefault("warmup_steps", min(2, values["steps"]))  # never more than the steps (refused)
    args = ["--data", str(data), "--out", str(out), "--model-config", json.dumps(config)]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


@pytest.fixture(scope="module")
def data(tmp_path_factory, bundled_dir):
    return prepare_data(tmp_path_factory.mktemp("train"), bundled_dir)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only contend on a shared machine
    yield
    torch.set_num_threads(threads)


def train_here(*args) -> int:
    from neoxja.train.cli import main

    return main(list(args))


# ----------------------------------------------------------------------------- schedule, groups, data


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    from neoxja.train.optim import lr_factor

    factors = [lr_factor(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(14)]
    np.testing.assert_allclose(factors[:5], [0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))  # strictly decreasing after the peak
    # halfway through the decay the cosine is at the midpoint between peak and floor
    assert lr_factor(9, 4, 15, 0.0) == pytest.approx(0.5)
    assert lr_factor(0, 0, 1, 0.1) == 1.0  # no warm-up, single step: the peak


def test_no_weight_decay_on_layernorm_and_biases():
    from neoxja.config import GPTNeoXJapaneseConfig
    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.train.optim import make_optimizer

    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig.from_dict({**TINY, "vocab_size": 100}))
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = (set(map(id, g["params"])) for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    names = dict(model.named_parameters())
    assert len(decay) + len(no_decay) == len(names) and not decay & no_decay
    for name, param in names.items():
        vector = "layernorm" in name or "layer_norm" in name or name.endswith(("bias", "dense_bias"))
        assert (id(param) in no_decay) == vector, name
    assert id(names["gpt_neox_japanese.layers.1.attention.dense_bias"]) in no_decay
    assert optimizer.defaults["fused"]  # fused AdamW on CPU


def test_batches_are_deterministic_and_ranks_split_the_global_batch():
    from neoxja.train.data import DistributedBatches, TokenWindows

    tokens = np.arange(1000, dtype=np.uint16)
    windows = TokenWindows(tokens, seq_len=8, seed=3)
    whole = DistributedBatches(windows, batch_size=6)(12)
    parts = [DistributedBatches(windows, batch_size=2, rank=r, world_size=3)(12) for r in range(3)]
    for i in (0, 1):  # inputs, targets
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
    x, y = whole
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (6, 8)  # targets are the next tokens
    assert torch.equal(x, TokenWindows(tokens, 8, seed=3).batch(12, 6)[0])  # a pure function of the position
    # one epoch visits every window exactly once, and the next epoch in another order
    n = windows.num_windows
    first = [windows.window_index(k) for k in range(n)]
    second = [windows.window_index(k) for k in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second


# ----------------------------------------------------------------------------- checkpoints


def _tiny_training_state():
    from neoxja.config import GPTNeoXJapaneseConfig
    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.train.distributed import DistEnv
    from neoxja.train.optim import make_optimizer

    torch.manual_seed(0)
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig.from_dict({**TINY, "vocab_size": 50}))
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    model(torch.randint(0, 50, (2, 8)), use_cache=False).logits.sum().backward()
    optimizer.step()
    return model, optimizer, DistEnv(0, 0, 1, torch.device("cpu"), False)


def test_checkpoints_are_atomic_keep_the_last_k_and_reject_corruption(tmp_path, monkeypatch):
    from neoxja.train import checkpoint as ckpt

    model, optimizer, env = _tiny_training_state()
    root = tmp_path / "checkpoints"

    def save(step):
        return ckpt.save_checkpoint(root, step, {"samples_seen": step}, model, optimizer, {"scheduler": {}},
                                    env, fsdp=False, keep=2)

    for step in (1, 2, 3):
        save(step)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 3]  # keep=2
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    # The process dies half-way through writing step 4: what was written stays out of sight.
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save(4)
    monkeypatch.setattr(torch, "save", real_save)
    assert (root / ".tmp-step_00000004").is_dir()
    assert ckpt.latest_checkpoint(root) == root / "step_00000003"

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    meta, trainer_state = ckpt.load_checkpoint(ckpt.latest_checkpoint(root), model, optimizer, env, fsdp=False)
    assert meta["step"] == 3 and meta["samples_seen"] == 3 and trainer_state == {"scheduler": {}}
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved_weights[name]), name
    ckpt.clean_partial(root)
    assert not (root / ".tmp-step_00000004").exists()

    # corrupt files are refused with the file's name, never unpickled
    state = root / "step_00000003" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="state.pt"):
        ckpt.load_checkpoint(root / "step_00000003", model, optimizer, env, fsdp=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"model": Evil()}, state)
    with pytest.raises(ckpt.CheckpointError, match="cannot be read safely"):
        ckpt.load_checkpoint(root / "step_00000003", model, optimizer, env, fsdp=False)
    assert not (Path.cwd() / "pwned").exists()
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint"):
        ckpt.load_checkpoint(tmp_path, model, optimizer, env, fsdp=False)


# ----------------------------------------------------------------------------- kill -9 and resume


def _wait_for_steps(metrics: Path, steps: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text(encoding="utf-8").count("\n") >= steps:
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended (rc {process.returncode}) before step {steps}")
        time.sleep(0.002)
    raise AssertionError(f"no step {steps} within {timeout} s")


def test_sigkill_then_resume_logs_exactly_the_same_losses(data, tmp_path):
    """A real process killed with SIGKILL between checkpoints, resumed with --resume auto, logs the
    same float32 losses, bit for bit, as an uninterrupted run. Dropout is on, so the RNG state
    matters; --grad-accum 2 and evaluation are on, so the data position and eval do too."""
    config = {**TINY, "attention_dropout": 0.1, "hidden_dropout": 0.1}
    options = dict(steps=40, save_every=5, keep=2, grad_accum=2, batch_size=2, eval_every=10, eval_steps=1)
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"

    uninterrupted = start(neoxja_command("train", *train_args(data, reference, config, **options)))
    process = subprocess.Popen(neoxja_command("train", *train_args(data, interrupted, config, **options)), cwd=REPO,
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_steps(interrupted / "metrics.jsonl", 13, process)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "final").exists()
    done_before_kill = len(losses(interrupted))
    assert 13 <= done_before_kill < 40

    resumed = run(neoxja_command("train", *train_args(data, interrupted, config, **options), "--resume", "auto"))
    assert "resumed from" in resumed.stdout
    finish(uninterrupted)

    from neoxja.train.metrics import read_metrics

    records, expected = read_metrics(interrupted / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]  # exactly
    assert [r.get("val_loss") for r in records] == [r.get("val_loss") for r in expected]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30, 40]
    for r in records:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= r.keys()
        assert r["tokens"] == r["step"] * 2 * 2 * 16 and r["tokens_per_s"] > 0
    assert [s.name for s in sorted((interrupted / "checkpoints").iterdir())] == ["step_00000035", "step_00000040"]
    png = (reference / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

    # the exported model: our from_pretrained and transformers load it and agree with each other
    from transformers import GPTNeoXJapaneseForCausalLM as HFModel

    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    final = reference / "final"
    assert {"config.json", "model.safetensors", "vocab.txt", "emoji.json"} <= {p.name for p in final.iterdir()}
    ours = GPTNeoXJapaneseForCausalLM.from_pretrained(final).eval()
    theirs = HFModel.from_pretrained(final).eval()
    ids = GPTNeoXJapaneseTokenizer.from_pretrained(final)("吾輩は猫である。", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)
    # and training did learn something
    assert expected[-1]["val_loss"] < expected[9]["val_loss"] < 10.0


def test_resume_applies_a_new_schedule_and_batch_and_refuses_the_rest(data, tmp_path, capsys):
    from neoxja.train.metrics import read_metrics
    from neoxja.train.optim import lr_factor

    out = tmp_path / "run"
    assert train_here(*train_args(data, out, steps=4, save_every=2, batch_size=4)) == 0
    capsys.readouterr()
    # the common case: more steps; and a lower learning rate, a smaller batch
    changed = dict(steps=8, save_every=2, lr=1e-3, min_lr=1e-4, batch_size=2)
    assert train_here(*train_args(data, out, **changed), "--resume", "auto") == 0
    said = capsys.readouterr().out
    assert "--steps 4 -> 8" in said and "--lr 0.003 -> 0.001" in said and "--batch-size 4 -> 2" in said
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records[4:]:  # the new schedule (peak 1e-3, floor 1e-4, 8 steps) from step 5 on
        assert r["lr"] == pytest.approx(1e-3 * lr_factor(r["step"] - 1, 2, 8, 0.1), rel=1e-12)
    # tokens actually consumed: 4 steps of 4 sequences, then steps of 2, each of 16 tokens
    assert [r["tokens"] for r in records] == [4 * 16 * s for s in range(1, 5)] + [(16 + 2 * s) * 16 for s in range(1, 5)]
    meta = json.loads((out / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["args"]["lr"] == 1e-3 and meta["args"]["batch_size"] == 2  # what was used
    assert meta["resumed"] == [{"step": 4, "changed": {"steps": [4, 8], "lr": [3e-3, 1e-3], "min_lr": [3e-3 / 10, 1e-4],
                                                       "batch_size": [4, 2]}}]

    def error(**options) -> str:
        assert train_here(*train_args(data, out, **{**changed, **options}), "--resume", "auto") == 2
        return capsys.readouterr().err

    assert "--steps 6 is below the step of" in error(steps=6)  # not `loss nan`
    assert "--seed 1337; resume with the same value (got 7)" in error(seed=7)
    other_model = train_args(data, out, config={**TINY, "hidden_size": 64}, **changed)
    assert train_here(*other_model, "--resume", "auto") == 2
    assert "--model-config" in capsys.readouterr().err
    # --steps equal to the checkpoint's: nothing to train, a clean summary
    assert train_here(*train_args(data, out, **changed), "--resume", "auto") == 0
    said = capsys.readouterr().out
    assert "nothing left to train" in said and f"done: step 8, loss {records[-1]['loss']:.4f}" in said


def test_resuming_another_model_size_is_one_clear_line(data, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    args = train_args(data, tmp_path / "run", steps=2, save_every=2)
    args[args.index("--model-config") + 1] = str(config)
    assert train_here(*args) == 0
    config.write_text(json.dumps({**TINY, "hidden_size": 64}))  # the same file, another model
    capsys.readouterr()
    args[args.index("--steps") + 1] = "4"
    assert train_here(*args, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a different model" in err and "size mismatch" not in err
    assert "embed_in.weight: checkpoint [" in err


def test_a_checkpoint_is_exported_to_a_model_directory(data, tmp_path, capsys):
    from neoxja.generate_cli import main as generate
    from neoxja.model import GPTNeoXJapaneseForCausalLM

    out = tmp_path / "run"
    assert train_here(*train_args(data, out, steps=4, save_every=2)) == 0
    checkpoint = out / "checkpoints" / "step_00000004"
    capsys.readouterr()
    assert generate(["--model", str(checkpoint), "--max-new-tokens", "2", "x"]) != 0
    err = capsys.readouterr().err
    assert f"is a training checkpoint" in err and f"neoxja train export-checkpoint {checkpoint} OUT_DIR" in err

    assert train_here("export-checkpoint", str(checkpoint), str(tmp_path / "model")) == 0
    assert generate(["--model", str(tmp_path / "model"), "--max-new-tokens", "2", "--seed", "0", "吾輩は"]) == 0
    exported = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    final = GPTNeoXJapaneseForCausalLM.from_pretrained(out / "final").state_dict()
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    capsys.readouterr()
    assert train_here("export-checkpoint", str(checkpoint), str(tmp_path / "model")) == 2  # never over a model
    assert "not an empty directory" in capsys.readouterr().err


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(data, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen(neoxja_command("train", *train_args(data, out, steps=100000)), cwd=REPO,
                             env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_steps(out / "metrics.jsonl", 1, first)
        assert train_here(*train_args(data, out, steps=2)) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another training run (pid {first.pid} on " in err
        assert first.poll() is None  # the first run is untouched
        os.kill(first.pid, signal.SIGKILL)  # the kernel drops the lock however the holder ends
    finally:
        first.kill()
        first.wait()
    assert train_here(*train_args(data, out, steps=2)) == 0


def test_ctrl_c_says_where_the_last_checkpoint_is_and_how_to_resume(data, tmp_path):
    out = tmp_path / "run"
    # Ctrl-C's SIGINT must reach Python's handler: a test run started in the background by a shell (`make test
    # &`, nohup) passes SIGINT on as ignored, and Python then leaves it ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = start(neoxja_command("train", *train_args(data, out, steps=100000, save_every=2)))
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        _wait_for_steps(out / "metrics.jsonl", 5, process)
        process.send_signal(signal.SIGINT)
        result = finish(process, check=False)
    finally:
        process.kill()
        process.wait()
    assert result.returncode == 130
    assert "Traceback" not in result.stderr
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert f"interrupted; the last checkpoint is {last} (step {int(last.name[5:])})" in result.stderr
    assert "--resume auto" in result.stderr


def test_a_full_disk_or_read_only_out_is_one_clear_line(data, tmp_path, monkeypatch, capsys):
    import errno

    import neoxja.train.checkpoint as ckpt
    from neoxja.train.metrics import MetricsLog

    # torch.save on a full disk: RuntimeError from inline_container.cc, naming neither the file nor the cause
    def torch_save_on_a_full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4176")

    monkeypatch.setattr(ckpt.torch, "save", torch_save_on_a_full_disk)
    assert train_here(*train_args(data, tmp_path / "a", steps=2, save_every=1)) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "state.pt" in err and str(tmp_path / "a") in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1 and "Traceback" not in err
    monkeypatch.undo()

    def write_on_a_full_disk(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MetricsLog, "write", write_on_a_full_disk)
    assert train_here(*train_args(data, tmp_path / "b", steps=2)) == 1
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'b'}: the disk is full" in err
    monkeypatch.undo()

    import safetensors.torch

    def safetensors_on_a_full_disk(*args, **kwargs):  # the final export: safetensors' own error type
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_on_a_full_disk)
    assert train_here(*train_args(data, tmp_path / "c", steps=1)) == 1
    assert f"cannot write under {tmp_path / 'c'}: the disk is full" in capsys.readouterr().err
    monkeypatch.undo()

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert train_here(*train_args(data, tmp_path / "ro" / "run", steps=1)) == 1
    assert "read-only file system" in capsys.readouterr().err
    from neoxja.train.prepare import main as prepare

    corpus = write_corpus(tmp_path / "c.jsonl", documents=3)
    assert prepare(["--tokenizer", str(data / "tokenizer"), "--out", str(tmp_path / "ro" / "d"), str(corpus)]) == 1
    assert "read-only file system" in capsys.readouterr().err


# ----------------------------------------------------------------------------- in-process runs


def test_gradient_accumulation_equals_the_larger_batch(data, tmp_path):
    assert train_here(*train_args(data, tmp_path / "big", batch_size=4, steps=4)) == 0
    assert train_here(*train_args(data, tmp_path / "accum", batch_size=2, grad_accum=2, steps=4)) == 0
    np.testing.assert_allclose(losses(tmp_path / "accum"), losses(tmp_path / "big"), rtol=0, atol=1e-5)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(data):
    from neoxja.config import GPTNeoXJapaneseConfig
    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.train.loop import HEAD_CHUNK_TOKENS, CausalLMLoss, checkpoint_layers

    config = GPTNeoXJapaneseConfig.from_dict({**TINY, "vocab_size": 300, "attention_dropout": 0.1})
    torch.manual_seed(0)
    plain = GPTNeoXJapaneseForCausalLM(config)
    recomputed = GPTNeoXJapaneseForCausalLM(config)
    recomputed.load_state_dict(plain.state_dict())
    checkpoint_layers(recomputed.gpt_neox_japanese.layers)
    x = torch.randint(0, 300, (3, HEAD_CHUNK_TOKENS // 2 + 5))  # the head runs in two chunks
    y = torch.randint(0, 300, x.shape)
    results = []
    for model, checkpointed in ((plain, False), (recomputed, True)):
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the RNG in recomputation
        loss = CausalLMLoss(model, checkpoint_head=checkpointed)(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0])
    ignored = y.clone()
    ignored[:, ::2] = -100  # targets the loss must not count, in the mean's denominator either
    chunked_and_plain = []
    for model, checkpointed in ((recomputed, True), (plain, False)):
        torch.manual_seed(1)
        chunked_and_plain.append(CausalLMLoss(model, checkpoint_head=checkpointed)(x, ignored))
    torch.testing.assert_close(*chunked_and_plain)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert set(dict(recomputed.named_parameters())) == set(dict(plain.named_parameters()))  # names unchanged
    # and through the command
    assert train_here(*train_args(data, Path(data).parent / "ckpt", steps=2, grad_checkpointing=True)) == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_and_resumes(data, tmp_path, dtype):
    out = tmp_path / dtype
    assert train_here(*train_args(data, out, steps=2, dtype=dtype, save_every=2)) == 0
    recorded = losses(out)
    assert len(recorded) == 2 and all(np.isfinite(recorded))
    state = torch.load(out / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)
    assert bool(state["scaler"]) == (dtype == "float16")  # a gradient scaler for fp16 only
    assert train_here(*train_args(data, out, steps=3, dtype=dtype, save_every=2), "--resume", "auto") == 0
    assert len(losses(out)) == 3 and losses(out)[:2] == recorded
    # a run saved without a gradient scaler continues in float16 with a fresh one, and the other way round
    other = "float16" if dtype == "bfloat16" else "float32"
    assert train_here(*train_args(data, out, steps=4, dtype=other, save_every=2), "--resume", "auto") == 0
    assert len(losses(out)) == 4 and all(np.isfinite(losses(out)))
    # the master weights stay float32 and so does the export
    from safetensors import safe_open

    with safe_open(out / "final" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_fine_tuning_from_a_pretrained_directory(data, tmp_path):
    assert train_here(*train_args(data, tmp_path / "base", steps=4)) == 0
    base_final = tmp_path / "base" / "final"
    args = train_args(data, tmp_path / "tuned", steps=2)
    args[args.index("--model-config"):args.index("--model-config") + 2] = ["--init-from", str(base_final)]
    assert train_here(*args) == 0
    base_config = json.loads((base_final / "config.json").read_text())
    tuned_config = json.loads((tmp_path / "tuned" / "final" / "config.json").read_text())
    assert tuned_config["hidden_size"] == base_config["hidden_size"] == 32
    # continuing from the trained weights: the first loss is the base run's level, not a fresh model's
    assert losses(tmp_path / "tuned")[0] < losses(tmp_path / "base")[0] - 0.05


def init_from(args: list[str], model) -> list[str]:
    """train_args with --init-from MODEL in place of --model-config."""
    i = args.index("--model-config")
    return args[:i] + ["--init-from", str(model)] + args[i + 2:]


def test_init_from_refuses_data_prepared_with_another_tokenizer(data, tmp_path, bundled_dir, capsys):
    import shutil

    from neoxja.train.prepare import main as prepare

    # same size, same files, one pair of lines swapped: the ids of two entries mean each other's text
    other = tmp_path / "other-vocab"
    other.mkdir()
    for name in ("vocab.txt", "emoji.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_dir / name, other / name)
    lines = (other / "vocab.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[100], lines[101] = lines[101], lines[100]
    (other / "vocab.txt").write_text("".join(lines), encoding="utf-8")
    mismatched = tmp_path / "mv"
    assert prepare(["--tokenizer", str(other), "--out", str(mismatched), "--num-proc", "1",
                    str(write_corpus(tmp_path / "c.jsonl", documents=10))]) == 0
    capsys.readouterr()

    tiny = dict(steps=1, batch_size=1, seq_len=8, warmup_steps=0)
    assert train_here(*init_from(train_args(mismatched, tmp_path / "a", **tiny), bundled_dir)) == 2
    err = capsys.readouterr().err
    assert "prepared with another tokenizer" in err and "--allow-tokenizer-mismatch" in err
    assert not (tmp_path / "a").exists()  # refused before anything was written
    # data prepared before the manifest recorded the fingerprint: the tokenizer kept with the data is compared
    manifest = json.loads((mismatched / "manifest.json").read_text())
    del manifest["tokenizer"]["fingerprint"]
    (mismatched / "manifest.json").write_text(json.dumps(manifest))
    assert train_here(*init_from(train_args(mismatched, tmp_path / "a", **tiny), bundled_dir)) == 2
    assert "prepared with another tokenizer" in capsys.readouterr().err
    assert train_here(*init_from(train_args(mismatched, tmp_path / "b", **tiny), bundled_dir),
                      "--allow-tokenizer-mismatch") == 0
    # the same vocabulary from another directory (the data keeps its own copy) is the same tokenizer
    assert train_here(*init_from(train_args(data, tmp_path / "c", **tiny), bundled_dir)) == 0


def test_model_vocabulary_smaller_than_the_tokenizer_is_refused(data, tmp_path, capsys):
    assert train_here(*train_args(data, tmp_path / "a", config={**TINY, "vocab_size": 100})) == 2
    assert "smaller than the data's tokenizer" in capsys.readouterr().err
    # larger (padded for speed) is fine: generation masks the ids the tokenizer lacks
    assert train_here(*train_args(data, tmp_path / "b", config={**TINY, "vocab_size": 8192}, steps=1)) == 0


def test_bad_arguments_and_inputs_are_clear_errors(data, tmp_path, capsys):
    def error(*args) -> str:
        assert train_here(*args) == 2
        return capsys.readouterr().err

    assert "max_position_embeddings" in error(*train_args(data, tmp_path / "a", seq_len=100))
    assert "run `neoxja prepare" in error(*train_args(tmp_path / "nothing", tmp_path / "a"))
    bad_config = train_args(data, tmp_path / "a")
    bad_config[bad_config.index("--model-config") + 1] = "{not json"
    assert "not valid JSON" in error(*bad_config)
    assert "not a checkpoint" in error(*train_args(data, tmp_path / "a"), "--resume", str(tmp_path))
    message = error(*train_args(data, tmp_path / "a", eval_every=1, eval_steps=1, batch_size=64, seq_len=32))
    assert "fewer than one batch" in message and "prepare the data again with --val-fraction 0.29" in message

    assert train_here(*train_args(data, tmp_path / "b", steps=2, save_every=2)) == 0
    assert "--seq-len 16" in error(*train_args(data, tmp_path / "b", steps=3, seq_len=8), "--resume", "auto")
    meta = tmp_path / "b" / "checkpoints" / "step_00000002" / "meta.json"
    good_meta = meta.read_text()
    for wrong in ("[]", '{"step": 2, "samples_seen": 4}'):  # valid JSON, not our metadata
        meta.write_text(wrong)
        assert "not the metadata" in error(*train_args(data, tmp_path / "b", steps=3), "--resume", "auto")
    meta.write_text(good_meta)
    assert "--resume auto" in error(*train_args(data, tmp_path / "b", steps=3))  # would mix two runs' checkpoints
    for bad in (dict(steps=0), dict(lr=1e-3, min_lr=1e-2), dict(lr="nan"), dict(lr="inf"), dict(min_lr="nan"),
                dict(grad_clip="nan"), dict(seed=-1), dict(seed=2**64 + 1), dict(device="foo")):
        with pytest.raises(SystemExit):  # argparse: out-of-range or non-finite numbers, unknown devices
            train_here(*train_args(data, tmp_path / "c", **bad))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train_here(*train_args(data, tmp_path / "c", device="cuda"))
        assert "CUDA is not available" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert "is a file" in error(*train_args(data, tmp_path / "afile"))

    # a data file that does not match its manifest (truncated) is refused before training
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in Path(data).iterdir():
        if path.is_file():
            (broken / path.name).write_bytes(path.read_bytes())
    (broken / "train.bin").write_bytes((broken / "train.bin").read_bytes()[:-2])
    assert "truncated" in error(*train_args(broken, tmp_path / "d"))


def test_hub_ids_resolve_through_huggingface_hub(data, tmp_path, bundled_dir, monkeypatch, capsys):
    """`--tokenizer` and `--init-from` accept hub ids; the hub is unreachable here, so a fake
    hf_hub_download serves a local directory per repo id."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    assert train_here(*train_args(data, tmp_path / "base", steps=1)) == 0
    repos = {"someone/aozora-small": bundled_dir, "someone/tiny-neox-ja": tmp_path / "base" / "final"}
    requested = []

    def fake_download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        path = Path(repos.get(repo_id, "/nonexistent")) / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("neoxja.hub.hub_reachable", lambda timeout=None: True)  # the (fake) hub answers
    from neoxja.train.prepare import main as prepare

    corpus = write_corpus(tmp_path / "c.jsonl", documents=5)
    assert prepare(["--tokenizer", "someone/aozora-small", "--out", str(tmp_path / "d"), "--num-proc", "1",
                    str(corpus)]) == 0
    assert ("someone/aozora-small", "vocab.txt") in requested
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["tokenizer"]["source"] == "someone/aozora-small"

    args = train_args(tmp_path / "d", tmp_path / "tuned", steps=1, seq_len=8, batch_size=1)
    args[args.index("--model-config"):args.index("--model-config") + 2] = ["--init-from", "someone/tiny-neox-ja"]
    assert train_here(*args) == 0
    assert ("someone/tiny-neox-ja", "config.json") in requested
    capsys.readouterr()

    # ids that do not resolve are clear errors
    args[args.index("--init-from") + 1] = "someone/missing"
    assert train_here(*args) == 2
    assert "--init-from someone/missing: cannot load it" in capsys.readouterr().err
    assert prepare(["--tokenizer", "someone/missing", "--out", str(tmp_path / "e"), str(corpus)]) == 2
    assert "--tokenizer someone/missing: cannot load it" in capsys.readouterr().err


def test_plain_cuda_means_each_process_its_own_gpu(monkeypatch):
    """--device cuda under torchrun: process LOCAL_RANK takes cuda:LOCAL_RANK (set_device needs an index)."""
    from neoxja.train import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    env = distributed.setup("cuda")
    assert env.device == torch.device("cuda", 3) and chosen == [torch.device("cuda", 3)]
    assert distributed.setup("cuda:1").device == torch.device("cuda", 1)


_RSS_AFTER_FREE = """
import sys, psutil, torch
from neoxja.train.memory import retain_freed_memory
took = retain_freed_memory() if sys.argv[1] == "retain" else None
proc = psutil.Process()
before = proc.memory_info().rss
x = torch.ones(64 * 2**20)  # 256 MiB, touched
del x
print(took, (proc.memory_info().rss - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_training_keeps_freed_blocks_for_the_next_step_instead_of_unmapping_them():
    """`neoxja train` calls retain_freed_memory(): a 256 MiB block freed stays in the process for reuse (so a
    step does not fault its pages in again), where by default glibc unmaps it at once."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE, mode], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent.parent).stdout.split()
        return out[0], float(out[1])

    took, kept = run("retain")
    assert took == "True"
    assert kept > 200, f"the freed 256 MiB should stay resident, RSS grew by {kept:.0f} MiB"
    _, default = run("default")
    assert default < 50, f"without it glibc unmaps the block (RSS grew by {default:.0f} MiB)"
