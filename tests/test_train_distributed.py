"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 log the same losses as one process with the
whole batch, and FSDP's distributed checkpoints resume on the same world size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import finish, losses, prepare_data, run, start, torchrun_command, train_args, train_here

from neoxja.train.metrics import read_metrics

STEPS = 6
OPTIONS = dict(steps=STEPS, batch_size=2, eval_every=3, eval_steps=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bundled_dir):
    """One process with batch 4, then 2 processes with batch 2 each: DDP, and FSDP saving at step 3.
    The parallel runs also use activation checkpointing (exact recomputation: the losses must not move)."""
    tmp = tmp_path_factory.mktemp("distributed")
    data = prepare_data(tmp, bundled_dir)
    ddp = start(torchrun_command(2, "train", *train_args(data, tmp / "ddp", **OPTIONS), "--grad-checkpointing"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the reference runs here, meanwhile (no process start-up to pay)
        assert train_here(*train_args(data, tmp / "single", **{**OPTIONS, "batch_size": 4})) == 0
    finally:
        torch.set_num_threads(threads)
    finish(ddp)
    run(torchrun_command(2, "train", *train_args(data, tmp / "fsdp", **OPTIONS, save_every=3), "--fsdp",
                         "--grad-checkpointing"))
    return data, tmp


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_log_the_losses_of_one_process_with_the_whole_batch(runs, kind):
    _, tmp = runs
    single, parallel = read_metrics(tmp / "single" / "metrics.jsonl"), read_metrics(tmp / kind / "metrics.jsonl")
    assert [r["step"] for r in parallel] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in parallel], [r["loss"] for r in single], rtol=0, atol=1e-5)
    val = [r["val_loss"] for r in parallel if "val_loss" in r]
    assert len(val) == 2
    np.testing.assert_allclose(val, [r["val_loss"] for r in single if "val_loss" in r], rtol=0, atol=1e-5)
    assert [r["tokens"] for r in parallel] == [r["tokens"] for r in single]  # tokens count the global batch

    # the exported weights agree too (FSDP gathers its shards for the export)
    from safetensors.torch import load_file

    expected = load_file(tmp / "single" / "final" / "model.safetensors")
    got = load_file(tmp / kind / "final" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_resumes_from_its_distributed_checkpoint(runs):
    data, tmp = runs
    checkpoint = tmp / "fsdp" / "checkpoints" / "step_00000003"
    assert (checkpoint / ".metadata").is_file() and (checkpoint / "rng_rank1.pt").is_file()
    run(torchrun_command(2, "train", *train_args(data, tmp / "resumed", **OPTIONS), "--fsdp",
                         "--grad-checkpointing", "--resume", str(checkpoint)))
    resumed, full = read_metrics(tmp / "resumed" / "metrics.jsonl"), read_metrics(tmp / "fsdp" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in resumed], losses(tmp / "fsdp")[3:], rtol=0, atol=1e-6)
    assert resumed[-1]["val_loss"] == pytest.approx(full[-1]["val_loss"], abs=1e-6)

    # another world size, or resuming without --fsdp, is refused with the reason (checked before any collective)
    from neoxja.train.checkpoint import CheckpointError, load_checkpoint
    from neoxja.train.distributed import DistEnv

    one_process = DistEnv(0, 0, 1, torch.device("cpu"), False)
    with pytest.raises(CheckpointError, match="same number"):
        load_checkpoint(checkpoint, None, None, one_process, fsdp=True)
    with pytest.raises(CheckpointError, match="with --fsdp"):
        load_checkpoint(checkpoint, None, None, one_process, fsdp=False)


def test_an_fsdp_checkpoint_exports_the_model_of_its_step(runs, tmp_path):
    from neoxja.model import GPTNeoXJapaneseForCausalLM

    _, tmp = runs
    assert train_here("export-checkpoint", str(tmp / "fsdp" / "checkpoints" / "step_00000006"), str(tmp_path / "m")) == 0
    exported = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    final = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp / "fsdp" / "final").state_dict()
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
