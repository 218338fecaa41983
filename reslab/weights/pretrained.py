"""Pretrained weights: a registry discovered from folders, fetching, the sha256 check, loading.

A *tag* names one set of weights in timm's ``model.tag`` form, e.g. ``cifar_resnet20.fast_c10``
(on the command line also ``cifar_resnet20:fast_c10``). Each tag is a folder in the Hugging Face
Hub layout, so that it can be uploaded unchanged::

    <TAG>/model.safetensors   the weights; their header carries the reslab checkpoint metadata
                              and ``pretrained_cfg`` (everything below except the file's own sha256)
    <TAG>/config.json         {"architecture", "tag", "name", "num_classes", "model_args",
                               "default", "pretrained_cfg": {..., "sha256", "url"}}
    <TAG>/model.md            the model card (data and split, accuracy with its command, recipe)
    <TAG>/README.md           the Hugging Face Hub front matter and a pointer to model.md

The registry is the union of the folders shipped inside the package (``reslab/weights/<TAG>/``)
and those under ``$RESLAB_HOME/weights/`` (default ``~/.cache/reslab/weights``, or
``$XDG_CACHE_HOME/reslab/weights``); a shipped tag wins over a cached one of the same name. A
tag's weights file is looked for in its folder, then in the cache folder of the same name, and
is otherwise downloaded from the ``url`` of its ``pretrained_cfg`` with
:func:`torch.hub.download_url_to_file` into the cache. Every file is checked against the sha256
of its ``config.json`` before it is loaded.

Layering: this module imports nothing from reslab (it loads weights into a model it is given),
so ``reslab.models`` may call it from ``create_model(..., pretrained=...)``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "model.md"
HUB_CARD_FILE = "README.md"
EMA_PREFIX = "ema/"
_TAG_RE = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_\-]+$")


def reslab_home() -> Path:
    """``$RESLAB_HOME``, else ``$XDG_CACHE_HOME/reslab``, else ``~/.cache/reslab``."""
    env = os.environ.get("RESLAB_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "reslab"


def cache_dir() -> Path:
    """The folder of cached / user-published tags: ``reslab_home() / "weights"``."""
    return reslab_home() / "weights"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header (``{}`` when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


@dataclass(frozen=True)
class WeightsEntry:
    """One tag of the registry: its folder and its ``config.json``."""

    name: str  # "cifar_resnet20.fast_c10"
    folder: Path
    source: str  # "package" or "cache"
    config: Mapping[str, Any]

    @property
    def architecture(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def tag(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return dict(self.config.get("pretrained_cfg") or {})

    @property
    def default(self) -> bool:
        return bool(self.config.get("default", False))

    @property
    def sha256(self) -> str | None:
        return self.pretrained_cfg.get("sha256")

    @property
    def url(self) -> str | None:
        return self.pretrained_cfg.get("url")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable weights config.json ({e}); fix or delete the folder") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("pretrained_cfg"), dict):
        raise ValueError(f"{path} has no 'pretrained_cfg' object; it was not written by `reslab weights publish`")
    return cfg


def _scan(root: Path, source: str) -> dict[str, WeightsEntry]:
    out: dict[str, WeightsEntry] = {}
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        if not (folder.is_dir() and _TAG_RE.match(folder.name) and (folder / CONFIG_FILE).is_file()):
            continue
        cfg = read_config(folder)
        if cfg.get("name", folder.name) != folder.name:
            raise ValueError(f"{folder / CONFIG_FILE} names the tag {cfg.get('name')!r} but its folder is "
                             f"{folder.name!r}; rename the folder to the tag")
        out[folder.name] = WeightsEntry(folder.name, folder, source, cfg)
    return out


def registry() -> dict[str, WeightsEntry]:
    """Every known tag: the package's folders, then the cache's (a shipped tag wins)."""
    return {**_scan(cache_dir(), "cache"), **_scan(PACKAGE_DIR, "package")}


def list_pretrained(pattern: str = "*") -> list[str]:
    """Tags (``model.tag``) whose name matches the fnmatch ``pattern``, sorted."""
    return sorted(n for n in registry() if fnmatch.fnmatchcase(n, pattern))


def tags_for(model: str) -> list[WeightsEntry]:
    """The entries of one architecture, the default first."""
    ents = [e for e in registry().values() if e.architecture == model]
    return sorted(ents, key=lambda e: (not e.default, e.name))


def default_entry(model: str) -> WeightsEntry | None:
    """The tag ``pretrained=True`` picks: the one marked ``"default": true``, else the first by name."""
    ents = tags_for(model)
    return ents[0] if ents else None


def get_entry(name: str, model: str | None = None) -> WeightsEntry:
    """The entry of ``model.tag`` / ``model:tag``, or of ``tag`` alone when ``model`` is given."""
    full = name.replace(":", ".", 1)
    if "." not in full and model is not None:
        full = f"{model}.{full}"
    reg = registry()
    if full in reg:
        e = reg[full]
        if model is not None and e.architecture != model:
            raise ValueError(f"weights {full!r} are for {e.architecture!r}, not {model!r}")
        return e
    arch = full.split(".", 1)[0]
    known = [e.name for e in tags_for(arch)]
    hint = f" (tags of {arch}: {', '.join(known)})" if known else " (see `reslab weights list`)"
    raise ValueError(f"unknown pretrained tag {full!r}{hint}; or pass a path to a .safetensors file or a tag folder")


def _no_weights_message(model: str) -> str:
    msg = f"no pretrained weights are registered for {model!r} (see `reslab weights list`)"
    if not model.startswith("cifar_"):
        msg += ("; for torchvision's ImageNet weights build the model and call "
                "reslab.load_torchvision_weights(model, torchvision_state_dict)")
    return msg


def _missing_message(entry: WeightsEntry, where: Path, why: str = "") -> str:
    sha = f" (sha256 {entry.sha256[:16]}...)" if entry.sha256 else ""
    return (f"pretrained weights {entry.name}: {WEIGHTS_FILE}{sha} not found{why}; put the file at {where} "
            f"(set RESLAB_HOME to use another folder)")


def fetch(entry: WeightsEntry, progress: bool | None = None) -> Path:
    """The verified weights file of ``entry``: in its folder, in the cache, or downloaded from its url."""
    local = entry.folder / WEIGHTS_FILE
    cached = cache_dir() / entry.name / WEIGHTS_FILE
    for cand in (local, cached):
        if cand.is_file():
            verify(cand, entry.sha256, entry.name)
            return cand
    if not entry.url:
        raise FileNotFoundError(_missing_message(entry, cached))
    if not entry.sha256:
        raise ValueError(f"{entry.folder / CONFIG_FILE} gives a url but no sha256; a download cannot be checked")
    cached.parent.mkdir(parents=True, exist_ok=True)
    part = cached.with_name(cached.name + ".part")
    show = sys.stderr.isatty() if progress is None else progress
    try:
        torch.hub.download_url_to_file(entry.url, str(part), progress=show)
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = str(getattr(e, "reason", e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(_missing_message(entry, cached, f" and the download from {entry.url} failed "
                                                               f"({reason})")) from None
    try:
        verify(part, entry.sha256, entry.name)
    except ValueError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, cached)
    return cached


def verify(path: Path, sha256: str | None, what: str) -> None:
    """Raise ``ValueError`` when ``path``'s sha256 differs from ``sha256`` (``None``: nothing to check)."""
    if not sha256:
        return
    got = sha256_file(path)
    if got != sha256:
        raise ValueError(f"sha256 mismatch for {path} ({what}): expected {sha256}, got {got}; the file is "
                         f"modified or corrupt; delete it and put the published file there")


def _cfg_from_header(path: Path, model: str | None) -> dict[str, Any]:
    meta = read_header(path)
    if "pretrained_cfg" in meta:
        return json.loads(meta["pretrained_cfg"])
    if "model" in meta:  # a `reslab train` checkpoint
        return {"architecture": meta["model"], "num_classes": int(meta.get("num_classes", 0)) or None,
                "model_args": json.loads(meta.get("model_kwargs", "{}"))}
    return {"architecture": model}


def resolve_pretrained(model: str, pretrained: bool | str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(verified weights file, pretrained_cfg) for ``create_model(model, pretrained=...)``.

    ``pretrained`` is ``True`` (the model's default tag), a tag (``"fast_c10"`` or
    ``"cifar_resnet20.fast_c10"``), or a path to a ``.safetensors`` file or to a tag folder.
    A local file beside a ``config.json`` is checked against its sha256.
    """
    if pretrained is True:
        entry = default_entry(model)
        if entry is None:
            raise ValueError(_no_weights_message(model))
        return fetch(entry), {**entry.pretrained_cfg, "name": entry.name}
    if not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(f"pretrained must be True, a tag or a path, got {pretrained!r}")
    p = Path(pretrained).expanduser()
    if p.exists():
        folder, file = (p, p / WEIGHTS_FILE) if p.is_dir() else (p.parent, p)
        if not file.is_file():
            raise FileNotFoundError(f"{p} has no {WEIGHTS_FILE}; pass a tag folder written by `reslab weights "
                                    f"publish` or a .safetensors file")
        if (folder / CONFIG_FILE).is_file() and file.name == WEIGHTS_FILE:
            cfg = read_config(folder)["pretrained_cfg"]
            verify(file, cfg.get("sha256"), str(folder))
        else:
            cfg = _cfg_from_header(file, model)
        arch = cfg.get("architecture")
        if arch and arch != model:
            raise ValueError(f"{file} holds weights for {arch!r}, not {model!r}; "
                             f"use create_model({arch!r}, pretrained=...)")
        return file, dict(cfg)
    text = str(pretrained)
    if "/" in text or os.sep in text or text.endswith(".safetensors"):
        raise FileNotFoundError(f"pretrained weights file {text} does not exist")
    entry = get_entry(text, model)
    return fetch(entry), {**entry.pretrained_cfg, "name": entry.name}


def resolve_model_spec(text: str, known_models: Collection[str]) -> Path | None:
    """The weights file of a command-line target ``MODEL:TAG``, ``MODEL.TAG`` or ``MODEL`` (its
    default tag), or ``None`` when ``text`` names no model (then it is a path the caller reports)."""
    name = text.replace(":", ".", 1)
    arch = name.split(".", 1)[0]
    if arch not in known_models:
        return None
    if "." in name:
        return fetch(get_entry(name))
    entry = default_entry(arch)
    if entry is None:
        raise ValueError(_no_weights_message(arch) + "; pass a run directory or a checkpoint instead")
    return fetch(entry)


def published_file(folder: str | os.PathLike) -> Path | None:
    """The sha256-checked ``model.safetensors`` of a tag folder (one with a ``config.json``), else ``None``."""
    folder = Path(folder)
    file = folder / WEIGHTS_FILE
    if not (folder.is_dir() and file.is_file() and (folder / CONFIG_FILE).is_file()):
        return None
    verify(file, read_config(folder)["pretrained_cfg"].get("sha256"), str(folder))
    return file


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a weights file into ``model`` (tensors cast to the model's dtypes, so fp16 storage loads
    into an fp32 model). A `reslab train` checkpoint whose evaluation uses EMA weights loads those.
    Missing, unexpected or mis-shaped tensors raise ``ValueError`` naming the first one."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    if ema and read_header(path).get("eval_weights") == "ema":
        tensors = ema
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    shape = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or extra or shape:
        what = (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}" if extra else
                f"{shape[0]!r} has shape {tuple(tensors[shape[0]].shape)} instead of {tuple(own[shape[0]].shape)}")
        raise ValueError(f"weights {path} do not fit this {type(model).__name__}: {what} ({len(missing)} missing, "
                         f"{len(extra)} unexpected, {len(shape)} mis-shaped tensors)")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)
    return model
