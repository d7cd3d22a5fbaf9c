"""Training checkpoints: written aside and renamed into place, the last K kept.

Layout of OUT/checkpoints/step_00000100/ (a directory counts only once `meta.json` is in it, and it
is renamed into place only after everything inside was written and fsync'ed):
  meta.json         step, samples consumed, world size, arguments that shape the data stream
  state.pt          model, optimizer, scheduler, grad scaler (single process / DDP; torch.save,
                    read back with torch.load(weights_only=True))
  or, with FSDP:    torch.distributed.checkpoint shards (*.distcp + .metadata) of model and optimizer,
                    plus trainer.pt with scheduler and grad scaler
  rng_rank{r}.pt    each rank's torch RNG state (dropout draws continue exactly)
  config.json, vocab.txt, emoji.json, ...  the model's config and the data's tokenizer, so that
                    `neoxja train export-checkpoint DIR OUT` makes a model directory of it
                    (`neoxja generate --model OUT`) from the checkpoint alone

Without FSDP the plain `state_dict()`s of the unwrapped module and optimizer are saved; with FSDP
the sharded ones from torch.distributed.checkpoint.state_dict (imported only then: it is slow to import).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from neoxja.checkpoint import CheckpointError  # one error type for every checkpoint: model or training
from neoxja.train.distributed import DistEnv, barrier
from neoxja.train.failures import as_write_error, is_torch_write_failure

NAME = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"




def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first (directories being written are hidden, `.tmp-*`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = NAME.match(path.name)
        if match and (path / "meta.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no meta.json; incomplete or not written by neoxja train)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_file}: corrupt: {err}") from None
    if not (isinstance(meta, dict) and all(isinstance(meta.get(key), int) for key in ("step", "samples_seen"))):
        raise CheckpointError(f"{meta_file}: not the metadata neoxja train writes (needs step and samples_seen)")
    return meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:  # torch's message names neither the file nor the cause
            if is_torch_write_failure(err):
                raise as_write_error(err, path) from None
            raise
        f.flush()
        os.fsync(f.fileno())


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: incomplete checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or not a plain tensor file
        raise CheckpointError(f"{path}: cannot be read safely: {err}") from None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP keeps the module it wraps in .module


def _remove(path: Path) -> None:
    """Rename out of sight first, so a half-deleted directory never looks like a checkpoint."""
    trash = path.with_name(TRASH_PREFIX + path.name)
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


def clean_partial(root: str | Path) -> None:
    """Remove what a killed run left half-written (call on rank 0 before training)."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    meta: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    env: DistEnv,
    fsdp: bool,
    keep: int,
    write_model_files=None,
) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep`. Collective: call on every rank.

    `write_model_files(directory)`, when given, is called on rank 0 to add the config and tokenizer files.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / (TMP_PREFIX + final.name)
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(env)

    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
        if env.is_main:
            _save_file(trainer_state, tmp / "trainer.pt")
    elif env.is_main:
        state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), **trainer_state}
        _save_file(state, tmp / "state.pt")
    _save_file(_rng_state(), tmp / f"rng_rank{env.rank}.pt")
    barrier(env)

    if env.is_main:
        if write_model_files is not None:
            write_model_files(tmp)
        meta_tmp = tmp / "meta.json.tmp"
        with open(meta_tmp, "w", encoding="utf-8") as f:
            json.dump({**meta, "step": step, "fsdp": fsdp, "world_size": env.world_size}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, tmp / "meta.json")
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again after a resume
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(root)[:-keep]:
            _remove(old)
    barrier(env)
    return final


def _check_shapes(path: Path, model: torch.nn.Module, saved) -> None:
    """One clear line when the checkpoint holds another model (torch would list every tensor)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}/state.pt: holds no model state")
    current = model.state_dict()
    differ = [(key, tuple(saved[key].shape), tuple(current[key].shape)) for key in current
              if key in saved and hasattr(saved[key], "shape") and tuple(saved[key].shape) != tuple(current[key].shape)]
    missing = [key for key in current if key not in saved]
    if differ or missing:
        what = (f"{len(differ)} of its {len(current)} tensors differ in shape (e.g. {differ[0][0]}: checkpoint "
                f"{list(differ[0][1])}, this model {list(differ[0][2])})" if differ
                else f"it lacks {len(missing)} of this model's tensors (e.g. {missing[0]})")
        raise CheckpointError(f"{path} holds a different model: {what}; resume with the model configuration it "
                              "was trained with")


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    env: DistEnv,
    fsdp: bool,
) -> tuple[dict, dict]:
    """Restore model, optimizer and this rank's RNG from `path`; returns (meta, trainer_state)."""
    path = Path(path)
    meta = read_meta(path)
    if bool(meta.get("fsdp")) != fsdp:
        kind = "FSDP (--fsdp)" if meta.get("fsdp") else "non-FSDP"
        advice = "with --fsdp" if meta.get("fsdp") else "without --fsdp"
        raise CheckpointError(f"{path} is a {kind} checkpoint: resume it {advice}")
    if fsdp and meta.get("world_size") != env.world_size:
        raise CheckpointError(
            f"{path} was written by {meta.get('world_size')} FSDP processes; resume it with the same number "
            f"(this run has {env.world_size})"
        )
    try:
        if fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optim_state}
            try:
                dcp.load(state, checkpoint_id=str(path))
            except Exception as err:
                raise CheckpointError(f"{path}: cannot load the distributed checkpoint: {err}") from None
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
            trainer_state = _load_file(path / "trainer.pt")
        else:
            state = _load_file(path / "state.pt")
            _check_shapes(path, _unwrap(model), state.get("model"))
            _unwrap(model).load_state_dict(state.pop("model"))
            optimizer.load_state_dict(state.pop("optimizer"))
            trainer_state = state
    except CheckpointError:
        raise
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: does not match this model / optimizer: {err}") from None

    rng_file = path / f"rng_rank{env.rank}.pt"
    if rng_file.is_file():
        rng = _load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:  # resumed on more processes than wrote it (DDP): a fresh, still seeded, stream for this rank
        print(f"warning: {rng_file.name} not in {path}; rank {env.rank} continues with a fresh RNG stream")
    return meta, trainer_state


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """A model directory (Hugging Face layout, as train's final/) from training checkpoint `path`."""
    from neoxja.config import GPTNeoXJapaneseConfig
    from neoxja.model import GPTNeoXJapaneseForCausalLM

    path, out = Path(path), Path(out)
    meta = read_meta(path)
    if not (path / "config.json").is_file() or not (path / "vocab.txt").is_file():
        raise CheckpointError(f"{path} was written before checkpoints carried the model's config.json and tokenizer; "
                              "it can only be resumed (its run's final/ is the exported model)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty directory; choose a new output directory")
    if meta.get("fsdp"):  # torch.distributed.checkpoint shards: gathered into one file first
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as scratch:
            try:
                dcp_to_torch_save(path, Path(scratch) / "state.pt")
            except Exception as err:  # noqa: BLE001 -- any failure of the shard reader
                raise CheckpointError(f"{path}: cannot read the distributed checkpoint: {err}") from None
            state = _load_file(Path(scratch) / "state.pt")
    else:
        state = _load_file(path / "state.pt")
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: holds no model state")
    try:
        config = GPTNeoXJapaneseConfig.from_json_file(path / "config.json")
        model = GPTNeoXJapaneseForCausalLM(config)
        model.load_state_dict({key.removeprefix("lm."): value for key, value in weights.items()})
    except (ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the weights do not fit its config.json: {err}") from None
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    for name in os.listdir(path):
        if name.endswith((".txt", ".json")) and name not in ("meta.json", "config.json"):
            shutil.copy2(path / name, tmp / name)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
