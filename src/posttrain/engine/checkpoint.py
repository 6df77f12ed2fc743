"""Atomic checkpoints: ``output_dir/checkpoints/step-N/``, resumable to the bit.

A checkpoint folder holds
    the model          ``save_pretrained`` layout (a PEFT model writes its adapter), or
                       ``model.safetensors`` of the state dict for a plain module;
    optimizer.pt, scheduler.pt;
    rng.pt             python, numpy, torch and CUDA generator states;
    trainer_state.json ``{"step": N, **extra}`` (epoch, data position, metrics ...);
    manifest.json      written last: every other file's size and sha256, the step, and the run's identity
                       (the config keys that alter the run and the training data's hashes, each with a
                       fingerprint), so that a resume can tell a damaged checkpoint or a different run.

Atomicity: everything is written into ``checkpoints/.tmp-step-N`` and that folder is renamed to
``step-N`` with ``os.replace`` only once complete. A kill at any moment leaves either no
``step-N`` or a complete one, and older checkpoints are removed (rotation) only after the new one
is in place, each renamed out of the ``step-*`` names before it is deleted. Only rank 0 writes; every rank
calls :meth:`Checkpointer.save` (it ends with a collective, so no rank reads a checkpoint that is not finished).

Verification. A copy, a full disk or a bad sector can still damage a complete folder afterwards:
:func:`verify_checkpoint` checks it against its manifest, and :func:`resolve_resume` takes the newest checkpoint
that verifies (``auto``), saying which it skipped and why, or refuses a named one that does not, naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from posttrain.config import ConfigError
from posttrain.engine.dist import broadcast_object, is_fsdp, unwrap_parallel
from posttrain.errors import TrainingError

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Generator states of python, numpy, torch (CPU) and every CUDA device."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_python(state: Any) -> Any:
    """``random.getstate`` is a nested tuple; torch.load(weights_only) gives it back as lists."""
    return tuple(_to_python(s) for s in state) if isinstance(state, (list, tuple)) else state


# --------------------------------------------------------------------------- model state


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict | None, dict | None]:
    """For FSDP2, the gathered full model and optimizer state dicts (a collective: every rank)."""
    if not is_fsdp(model):
        return None, optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_sd, optim_sd


def full_model_state(model: nn.Module) -> dict | None:
    """The whole model's state dict gathered from its FSDP2 shards (a collective: call it on every rank), or None
    for a model that is not sharded (its own state dict is whole). A tied parameter (lm_head = embeddings) is kept
    under its first name only, as `save_pretrained` stores it."""
    state = _full_state(model, None)[0]
    if state is None:
        return None
    first = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return {k: v for k, v in state.items() if k not in tied}


def _write_model(model: nn.Module, folder: Path, state_dict: dict | None) -> None:
    inner = unwrap_parallel(model)
    if hasattr(inner, "save_pretrained"):
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        inner.save_pretrained(str(folder), **kwargs)
    elif state_dict is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "model.safetensors"))
    else:
        save_model(inner, str(folder / "model.safetensors"))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TrainingError(f"{folder}: no model weights (*.safetensors) in the checkpoint")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _load_model(model: nn.Module, folder: Path) -> None:
    inner = unwrap_parallel(model)
    state = _read_weights(folder)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    if hasattr(inner, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(inner, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise TrainingError(f"{folder}: adapter weights do not fit the model: {unexpected[:5]}")
        return
    missing, unexpected = inner.load_state_dict(state, strict=False)
    # save_pretrained drops tied copies (lm_head = embeddings): those may be missing, nothing else.
    params = dict(inner.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise TrainingError(
            f"{folder}: checkpoint weights do not fit the model (missing {untied[:5]}, unexpected {list(unexpected)[:5]})"
        )


# --------------------------------------------------------------------------- manifest


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(value: Any) -> str:
    """sha256 of a JSON-able value in canonical form (sorted keys): equal values, equal fingerprints."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def run_identity(config: dict[str, Any], data: dict[str, str]) -> dict[str, Any]:
    """What a manifest records of the run: `config` (dotted key -> value, the keys that alter the run) and `data`
    (training source -> sha256 of its contents), each with its fingerprint."""
    return {"config": config, "config_fingerprint": fingerprint(config),
            "data": data, "data_fingerprint": fingerprint(sorted(data.values()))}


def _write_manifest(folder: Path, step: int, identity: dict[str, Any] | None) -> None:
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"step": step, "files": files, **(identity or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise TrainingError(f"{path}: missing (a checkpoint written before manifests, or not a checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise TrainingError(f"{path}: not a checkpoint manifest")
    return manifest


def verify_checkpoint(folder: str | Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256; else what is wrong, naming the
    file."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except TrainingError as e:
        return str(e)
    for rel, want in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{path}: {size} bytes, the manifest says {want.get('size')} (truncated or damaged)"
        if file_sha256(path) != want.get("sha256"):
            return f"{path}: contents differ from the manifest's sha256 (damaged)"
    return None


def identity_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The differences between a checkpoint's run identity and the current run's, one line each (empty: same run).
    A checkpoint without an identity (written by a library call, not a command) has nothing to compare."""
    if "config" not in saved or "config" not in current:
        return []
    changes = []
    old, new = saved["config"], current["config"]
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            changes.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    if saved.get("data_fingerprint") != current.get("data_fingerprint"):
        before = ", ".join(f"{k} ({v[:12]})" for k, v in saved.get("data", {}).items())
        after = ", ".join(f"{k} ({v[:12]})" for k, v in current.get("data", {}).items())
        changes.append(f"training data: {before} -> {after}")
    return changes


def link_identical(checkpoint: str | Path, other: str | Path) -> int:
    """Replace each file of `checkpoint` whose twin in `other` (same relative path, size and sha256) holds the same
    bytes with a hard link to that twin: a finished run's last checkpoint and its final/ then share one copy of the
    weights. Each swap is one `os.replace`, so the checkpoint verifies at every moment. Returns the files linked."""
    checkpoint, other = Path(checkpoint), Path(other)
    linked = 0
    for rel, want in read_manifest(checkpoint)["files"].items():
        mine, twin = checkpoint / rel, other / rel
        if not twin.is_file() or twin.stat().st_size != want["size"] or os.path.samefile(mine, twin):
            continue
        if file_sha256(twin) != want["sha256"]:
            continue
        tmp = mine.with_name(f".link-{mine.name}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(twin, tmp)
        except OSError:  # another filesystem, or no hard links there: keep the copy
            continue
        os.replace(tmp, mine)
        linked += 1
    return linked


# --------------------------------------------------------------------------- checkpointer


_DISK_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_DISK_MESSAGES = tuple(os.strerror(code) for code in _DISK_ERRORS)


class Checkpointer:
    """Saves and finds ``output_dir/checkpoints/step-N``; keeps the ``keep`` newest (``keep <= 0``: all).
    ``identity``: the run's :func:`run_identity`, recorded in every manifest (rank 0's; None elsewhere)."""

    def __init__(self, output_dir: str | Path, keep: int = 2, identity: dict[str, Any] | None = None):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = int(keep)
        self.identity = identity

    def steps(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.root)

    def latest(self) -> Path | None:
        found = self.steps()
        return found[-1][1] if found else None

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        extra: dict[str, Any] | None = None,
        tokenizer: Any = None,
    ) -> Path:
        """Write ``step-N`` atomically (module doc). Every rank calls this; rank 0 writes."""
        final = self.root / f"step-{int(step)}"
        model_sd, optim_sd = _full_state(model, optimizer)
        error: str | None = None
        if _rank() == 0:
            try:
                self._write(final, int(step), model, model_sd, optim_sd, scheduler, extra or {}, tokenizer)
            except Exception as e:  # reported on every rank below, so no rank waits forever
                error = f"{type(e).__name__}: {e}"
                # safetensors reports the OS error in its message, not as an OSError
                if (isinstance(e, OSError) and e.errno in _DISK_ERRORS) or any(m in str(e) for m in _DISK_MESSAGES):
                    kept = self.latest()
                    error += (f" -- the disk (or a file-size or quota limit) is full; the last good checkpoint "
                              f"{kept if kept is not None else '(none yet)'} is kept. Free space, then resume=auto")
        # The broadcast doubles as the barrier: no rank goes on before the folder is complete.
        error = broadcast_object(error)
        if error is not None:
            raise TrainingError(f"saving checkpoint {final} failed: {error}")
        return final

    def _write(self, final: Path, step: int, model, model_sd, optim_sd, scheduler, extra, tokenizer) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step}"
        for leftover in [tmp, *self.root.glob(".del-step-*")]:  # a kill's leftovers
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
        try:
            _write_model(model, tmp, model_sd)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if optim_sd is not None:
                torch.save(optim_sd, tmp / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            text = json.dumps({"step": step, **extra}, indent=2)
            (tmp / STATE_FILE).write_text(text)
            _write_manifest(tmp, step, self.identity)
            if final.exists():
                # Re-saving a step (after a resume): move the old one aside, never delete it first.
                old = self.root / f".old-step-{step}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._rotate()

    def _rotate(self) -> None:
        if self.keep <= 0:
            return
        for step, path in self.steps()[: -self.keep]:
            # Out of the step-* names first: a kill during the delete leaves no half-deleted "checkpoint".
            gone = self.root / f".del-step-{step}"
            os.replace(path, gone)
            shutil.rmtree(gone, ignore_errors=True)

    def load(
        self,
        path: str | Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
    ) -> dict[str, Any]:
        """Restore the model, optimizer, scheduler and RNG from ``path``; return trainer_state."""
        return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Restore a ``step-N`` folder written by :class:`Checkpointer`; return its trainer_state dict."""
    folder = Path(path)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise TrainingError(f"{folder}: not a complete checkpoint (no {STATE_FILE})")
    _load_model(model, folder)
    if optimizer is not None and (folder / "optimizer.pt").is_file():
        optim_sd = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        if is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(optim_sd)
    if scheduler is not None and (folder / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=True)
    rng["python"] = _to_python(rng["python"])
    set_rng_state(rng)
    return json.loads(state_file.read_text())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _newest_verified(root: Path, say) -> Path | None:
    """The newest checkpoint under `root` that verifies; each newer one that does not is skipped with its reason."""
    for _, path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        say(f"resume: skipping {path}: {problem}")
    return None


def resolve_resume(resume: str | bool | None, output_dir: str | Path, say=_say) -> Path | None:
    """The checkpoint to resume from: ``auto`` -> the newest in output_dir that verifies (or None), ``false`` ->
    None, a path -> that checkpoint, which must verify (a run folder resolves to its newest that verifies).
    ``say(line)`` reports each checkpoint skipped and why."""
    value = str(resume).strip() if resume is not None else ""
    if value.lower() in ("", "false", "no", "none", "0"):
        return None
    if value.lower() == "auto":
        root = Path(output_dir) / "checkpoints"
        found = _newest_verified(root, say)
        if found is None and list_checkpoints(root):
            say(f"resume: no checkpoint in {root} verifies; starting afresh")
        return found
    path = Path(value)
    if (path / STATE_FILE).is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise TrainingError(f"`resume`: {path} does not verify: {problem}")
        return path
    for root in (path / "checkpoints", path):
        if list_checkpoints(root):
            found = _newest_verified(root, say)
            if found is None:
                raise TrainingError(f"`resume`: no checkpoint in {root} verifies (reasons above)")
            return found
    raise ConfigError(f"`resume`: {path} is not a checkpoint (no {STATE_FILE}) and holds none")
