"""Atomic checkpoints and exact-resume state.

Layout of a run directory:

    runs/<name>/step_000200/   model.safetensors + config.json (HF format), tokenizer files,
                               recipe.yaml, trainer_state.pt (optimizer, scheduler, step),
                               rng_state_<rank>.pt (one per process)
    runs/<name>/final/         the finished run's last checkpoint (files hard-linked to its step dir)
    runs/<name>/metrics.jsonl  one JSON object per logged step

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash leaves
either the old checkpoint or the new one, never half of one. Its last file is manifest.json, the size
and SHA-256 of every other file: a checkpoint damaged later (a truncated copy, a full disk, bit rot)
fails `verify` and `--resume` falls back to the newest intact one. Loading never unpickles arbitrary
objects: weights come from safetensors and trainer state from `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

STEP_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of every file of a finished checkpoint, written last (atomically)."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    tmp = directory / f".{MANIFEST}"
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(directory / MANIFEST)


def verify(directory: Path) -> str | None:
    """Why the checkpoint in `directory` cannot be trusted (a file missing, of another size or content than
    its manifest says), or None when it is intact. A checkpoint without a manifest (written before there
    were manifests) is taken as it is."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return "its manifest.json is unreadable"
    for name, want in entries.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not have the content that was written (checksum)"
    return None


def publish(tmp: Path, target: Path) -> None:
    """Move a finished temporary directory to `target`, replacing any older one atomically enough:
    the old directory is renamed aside first, so at every moment one complete copy exists."""
    old = target.with_name(f".old_{target.name}")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def temp_dir(run_dir: Path, name: str) -> Path:
    tmp = Path(run_dir) / f".tmp_{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def link_copy(src: Path, dst: Path) -> None:
    """Copy a directory tree using hard links where the filesystem allows (no extra disk)."""

    def copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (and stale temporary directories)."""
    ckpts = list_checkpoints(run_dir)
    for _, path in ckpts[: max(0, len(ckpts) - max(keep, 1))]:
        shutil.rmtree(path, ignore_errors=True)


# --- RNG --------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every RNG the loop touches, as tensors and plain Python values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_rng(directory: Path, rank: int) -> None:
    torch.save(rng_state(), Path(directory) / f"rng_state_{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    path = Path(directory) / f"rng_state_{rank}.pt"
    if path.is_file():
        set_rng_state(torch.load(path, weights_only=True))


# --- weights ----------------------------------------------------------------------------------------


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: model.safetensors or a sharded index (never pickle)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = [directory / "model.safetensors"]
    if index.is_file():
        files = [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif not files[0].is_file():
        raise ValueError(f"{directory}: no model.safetensors (pickled checkpoints are not loaded)")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors' own error type: a truncated or corrupt file
            raise ValueError(f"{f} is damaged or incomplete ({str(e).splitlines()[0]})") from None
    return state


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load safetensors weights (single file or sharded index) into `model` in place.

    Missing keys are tolerated only for a tied output head (HF omits it from the file).
    """
    adapter = Path(directory) / "adapter_model.safetensors"
    if adapter.is_file():  # a LoRA checkpoint: only the adapter weights were saved
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(model, load_file(adapter))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{directory}: adapter weights do not match the model ({result.unexpected_keys})")
        return
    state = read_safetensors(directory)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if _is_tied(model) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{directory}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def _is_tied(model: torch.nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings()  # the GPT core and HF models both have it
    return head is not None and emb is not None and head.weight is emb.weight


def save_trainer_state(directory: Path, state: dict) -> None:
    torch.save(state, Path(directory) / STATE_FILE)


def load_trainer_state(directory: Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, weights_only=True)
