"""``reslab weights list | show TAG | publish RUN --tag TAG``: pretrained weights and their model cards.

``publish`` turns a finished run into a tag folder in the Hugging Face Hub layout (``model.safetensors``,
``config.json``, ``model.md`` (the card), ``README.md`` (Hub front matter); uploadable unchanged,
``huggingface_hub`` is not needed). With
``--data-dir`` it evaluates the weights *as written* (after ``--half``) on the test split, with the same
code path as ``reslab eval MODEL:TAG``, and records the accuracy with that exact command. It never selects
anything on the test set: it publishes the run's last checkpoint (``best`` only when the run chose it on a
validation split). The publishing logic lives here because it needs the training layer (checkpoints,
evaluation) while :mod:`reslab.weights` stays a leaf that ``reslab.models`` may import.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

_TAG_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
FP16_MAX = 65504.0

DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "scikit-learn digits",
                 "synthetic": "reslab's synthetic test data", "folder": "an image folder"}
DATASET_IDS = {"cifar10": "cifar10", "cifar100": "cifar100"}  # Hugging Face Hub data set ids
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
PAPERS = [("cifar_plain", "the plain (no-shortcut) twin of the CIFAR networks of He et al. 2015, \"Deep Residual "
                          "Learning for Image Recognition\", Sec. 4.2"),
          ("cifar_resnet", "He et al. 2015, \"Deep Residual Learning for Image Recognition\", Sec. 4.2 "
                           "(6n+2 layers, option-A shortcuts)")]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("weights", help="pretrained weights: list, show, publish a run with a model card",
                              description="Pretrained weights (tags such as cifar_resnet20.TAG; on the command line "
                                          "MODEL:TAG works wherever a run directory does). See docs/weights.md.")
    sub = p.add_subparsers(dest="weights_command", metavar="ACTION")
    ls = sub.add_parser("list", help="the known tags (shipped in the package and in $RESLAB_HOME/weights)")
    ls.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern on the tag, e.g. 'cifar_resnet*'")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=run_list)
    sh = sub.add_parser("show", help="one tag's pretrained_cfg (data, accuracy and its command, recipe, sha256)")
    sh.add_argument("tag", help="MODEL.TAG or MODEL:TAG (or MODEL: its default tag)")
    sh.add_argument("--json", action="store_true", help="print config.json")
    sh.set_defaults(func=run_show)
    pb = sub.add_parser("publish", help="write a run's weights as a tag folder: model.safetensors, config.json, "
                        "model.md, README.md",
                        description="Write RUN's last checkpoint (the weights its evaluation uses) as a tag folder in "
                                    "the Hugging Face Hub layout. With --data-dir, evaluate the written weights on the "
                                    "test split and record the accuracy with its command.")
    pb.add_argument("run", metavar="RUN", help="run directory or checkpoint (.safetensors) written by reslab train")
    pb.add_argument("--tag", required=True, help="the tag, e.g. fast_c10 (the model name is prepended) or "
                                                 "cifar_resnet20.fast_c10")
    pb.add_argument("--out", help="output folder (default $RESLAB_HOME/weights/MODEL.TAG, usable at once as MODEL:TAG;"
                                  " to ship in the package: reslab/weights/MODEL.TAG)")
    pb.add_argument("--half", action="store_true", help="store floating tensors as float16 (they load into fp32 models)")
    pb.add_argument("--data-dir", help="evaluate the written weights on the test split of the data under this folder")
    pb.add_argument("--which", choices=("last", "best"), default="last",
                    help="checkpoint of a run directory (default last; best only if chosen on a validation split)")
    pb.add_argument("--data-source",
                    help="what the training data was: 'jpeg' (the JPEG re-encoding of CIFAR-10 distributed with the "
                         "project), 'official' (the official release) or a sentence (default: not stated)")
    pb.add_argument("--note", action="append", default=[], help="a deviation or remark for the card (repeatable)")
    pb.add_argument("--default", action="store_true", help="mark the tag as the model's default (pretrained=True)")
    pb.add_argument("--url", help="where model.safetensors will be downloadable (recorded; fetched when absent)")
    pb.add_argument("--device", default="cpu", help="device of the evaluation (default cpu)")
    pb.add_argument("--force", action="store_true", help="overwrite an existing non-empty --out folder")
    pb.add_argument("--json", action="store_true", help="print config.json")
    pb.set_defaults(func=run_publish)
    p.set_defaults(func=lambda args: _help(p))
    return p


def _help(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


# -- list / show -------------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "-"


def _availability(e: Any) -> str:
    from reslab.weights import WEIGHTS_FILE, cache_dir

    if (e.folder / WEIGHTS_FILE).is_file() or (cache_dir() / e.name / WEIGHTS_FILE).is_file():
        return "local"
    return "url" if e.url else "missing"


def _summary(e: Any) -> dict[str, Any]:
    c = e.pretrained_cfg
    acc = c.get("accuracy") or {}
    return dict(name=e.name, architecture=e.architecture, default=getattr(_default_of(e.architecture), "name", None) == e.name, source=e.source,
                file=_availability(e), dataset=c.get("dataset"), dtype=c.get("dtype"), top1=acc.get("top1"),
                top1_flip=acc.get("top1_flip"), command=acc.get("command"), folder=str(e.folder))


def _default_of(model: str) -> Any:
    from reslab.weights import default_entry

    return default_entry(model)


def run_list(args: argparse.Namespace) -> int:
    from reslab.weights import cache_dir, list_pretrained, registry

    reg = registry()
    rows = [_summary(reg[n]) for n in list_pretrained(args.pattern)]
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no pretrained weights match {args.pattern!r} (shipped in the package or in {cache_dir()})")
        return 0
    print(f"{'tag':<34} {'data':<9} {'dtype':<8} {'top1':>7} {'flip':>7} {'file':<7} source")
    for r in rows:
        star = "*" if r["default"] else " "
        print(f"{star}{r['name']:<33} {r['dataset'] or '-':<9} {r['dtype'] or '-':<8} {_pct(r['top1']):>7} "
              f"{_pct(r['top1_flip']):>7} {r['file']:<7} {r['source']}")
    print("* = the model's default (pretrained=True); top1 = single view on the test split, flip = flip TTA; "
          "`reslab weights show TAG` gives the commands")
    return 0


def _entry_for(text: str) -> Any:
    from reslab.weights import default_entry, get_entry

    if ":" not in text and "." not in text:
        e = default_entry(text)
        if e is None:
            raise ValueError(f"no pretrained weights for {text!r}; see `reslab weights list`")
        return e
    return get_entry(text)


def run_show(args: argparse.Namespace) -> int:
    from reslab.weights import CARD_FILE

    e = _entry_for(args.tag)
    if args.json:
        print(json.dumps(dict(e.config), indent=1))
        return 0
    c = e.pretrained_cfg
    acc = c.get("accuracy") or {}
    print(f"{e.name}  ({e.source}: {e.folder}; weights file: {_availability(e)})")
    for k in ("architecture", "num_classes", "input_size", "mean", "std", "dataset", "train_split", "eval_split",
              "data_source", "dtype", "step", "epoch", "reslab_version", "sha256", "url"):
        if c.get(k) is not None:
            print(f"  {k:<15} {c[k]}")
    if acc:
        print(f"  top1 (single)   {_pct(acc.get('top1'))} on {acc.get('n')} images: {acc.get('command')}")
        if acc.get("top1_flip") is not None:
            print(f"  top1 (flip TTA) {_pct(acc.get('top1_flip'))}: {acc.get('command_flip')}")
    else:
        print("  accuracy        not measured (publish with --data-dir measures it)")
    if c.get("official_test_command"):
        print(f"  official test   {c['official_test_command']}")
    print(f"  model card      {e.folder / CARD_FILE}")
    return 0


# -- publish -----------------------------------------------------------------------------------------
def _data_source_text(source: str | None, dataset: str) -> str:
    name = DATASET_NAMES.get(dataset, dataset)
    if source is None:
        return f"{name} (the publisher did not state which copy)"
    if source == "jpeg":
        count = "the 60,000 images" if dataset in ("cifar10", "cifar100") else "the images"
        return (f"the JPEG re-encoding of {name} distributed with the reslab project ({count} "
                f"re-encoded as JPEG, so the pixels differ slightly from the official release)")
    if source == "official":
        return f"the official {name} release ({OFFICIAL_URL})"
    return source


def _split_text(d: dict[str, Any]) -> str:
    parts = ["the training split"]
    if d.get("val_split"):
        parts.append(f"minus {d['val_split']} images held out for validation")
    if d.get("train_subset"):
        parts.append(f"(a seeded subset of {d['train_subset']} images)")
    return " ".join(parts)


def _input_size(d: dict[str, Any]) -> list[int]:
    side = d.get("image_size") or {"digits": 8, "folder": 224}.get(d.get("name", ""), 32)
    channels = 1 if d.get("name") == "digits" else int(d.get("channels") or 3)
    return [channels, int(side), int(side)]


def publish(run: str | os.PathLike, tag: str, out: str | os.PathLike | None = None, half: bool = False,
            data_dir: str | None = None, which: str = "last", data_source: str | None = None,
            notes: list[str] | None = None, default: bool = False, url: str | None = None, device: str = "cpu",
            force: bool = False, log: Any = None) -> dict[str, Any]:
    """Write ``run``'s weights as a tag folder; returns its config.json (see the module docstring)."""
    import torch

    from reslab import __version__
    from reslab.train import build_model, evaluate_checkpoint
    from reslab.train import checkpoint as ckpt
    from reslab.weights import (CARD_FILE, CONFIG_FILE, HUB_CARD_FILE, WEIGHTS_FILE, cache_dir, read_header,
                                sha256_file)

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    wpath = ckpt.resolve_checkpoint(run, which)
    tensors, meta = ckpt.load_weights(wpath)
    info = ckpt.CheckpointInfo.from_metadata(meta, wpath)
    train_cfg = json.loads(json.dumps(info.config))  # deep copy
    if not train_cfg:
        raise ValueError(f"{wpath} carries no run config; publish needs a checkpoint written by reslab train")
    d = train_cfg.setdefault("data", {})
    if which == "best" and Path(run).is_dir() and wpath.name != "best.safetensors":
        raise ValueError(f"{run} has no best checkpoint (best is chosen on a validation split, data.val_split, "
                         f"and this run has none); publish the last checkpoint (--which last)")
    if wpath.name == "best.safetensors" and not d.get("val_split"):
        raise ValueError(f"{wpath} was selected on the test set (the run has no validation split); publish the "
                         f"last checkpoint (--which last)")
    model_name = info.model
    if "." in tag:
        arch, short = tag.split(".", 1)
        if arch != model_name:
            raise ValueError(f"--tag {tag!r} names {arch!r} but the run trained {model_name!r}; "
                             f"use --tag {model_name}.{short}")
    else:
        short = tag
    if not _TAG_RE.match(short):
        raise ValueError(f"--tag {short!r} must use only letters, digits, '_' and '-' (e.g. fast_c10)")
    name = f"{model_name}.{short}"
    out_dir = Path(out) if out else cache_dir() / name
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not force):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out or pass --force")
    # The weights evaluation uses (EMA when the run evaluated EMA weights), in the storage dtype.
    weights, ema = ckpt.split_ema(tensors)
    use_ema = info.eval_weights == "ema" and bool(ema)
    weights = ema if use_ema else weights
    if half:
        big = [k for k, v in weights.items() if v.is_floating_point() and v.abs().max().item() > FP16_MAX]
        if big:
            raise ValueError(f"tensor {big[0]!r} exceeds the float16 range; publish without --half")
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    model = build_model(model_name, info.num_classes, dict(info.model_kwargs))
    ckpt.load_into(model, {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, wpath,
                   model_name)  # the architecture check; load_pretrained casts the same way
    n_params = sum(p.numel() for p in model.parameters())
    # Machine paths never leave the machine: data_dir becomes the default placeholder.
    d["data_dir"] = "data"
    # The config the header carries is the evaluation's: the full test split, single view
    # (`--tta flip` asks for the flip-TTA number). The training config is kept unchanged beside it.
    eval_cfg = json.loads(json.dumps(train_cfg))
    eval_cfg["data"].update(val_split=0, test_subset=None)
    eval_cfg.setdefault("eval", {})["tta"] = "none"
    dataset = d.get("name", "?")
    dtype = "float16" if half else "float32"
    spec = f"{model_name}:{short}"
    official = (f"reslab eval {spec} --data-dir OFFICIAL --json  # OFFICIAL/{'cifar-10-batches-py' if dataset == 'cifar10' else 'cifar-100-python'}"
                f" = the official python release ({OFFICIAL_URL}); reslab downloads it there with an md5 check "
                f"when online") if dataset in ("cifar10", "cifar100") else None
    pcfg: dict[str, Any] = {
        "name": name, "architecture": model_name, "tag": short, "num_classes": info.num_classes,
        "model_args": dict(info.model_kwargs), "input_size": _input_size(d), "mean": d.get("mean"), "std": d.get("std"),
        "dataset": dataset, "train_split": _split_text(d), "eval_split": "test",
        "data_source": _data_source_text(data_source, dataset), "accuracy": None, "official_test_command": official,
        "train_config": train_cfg, "step": info.step, "epoch": info.epoch, "weights": "ema" if use_ema else "model",
        "source_checkpoint": wpath.name, "dtype": dtype, "params": n_params, "reslab_version": __version__,
        "torch_version": torch.__version__, "license": "mit", "url": url, "notes": list(notes or []),
    }

    def header() -> dict[str, str]:
        m = ckpt.make_metadata(model_name, info.model_kwargs, info.num_classes, info.step, info.epoch, eval_cfg,
                               "model", info.metrics)
        m["pretrained_cfg"] = json.dumps(pcfg)
        return m

    out_dir.mkdir(parents=True, exist_ok=True)
    wfile = out_dir / WEIGHTS_FILE
    ckpt.save_weights(wfile, weights, header())
    if data_dir is not None:
        say(f"publish: evaluating {name} as written ({dtype}) on the test split, single view")
        one = evaluate_checkpoint(wfile, data_dir=data_dir, tta="none", device=device)
        say(f"publish: single view top1 {one['top1']:.4f}; evaluating with flip TTA")
        flip = evaluate_checkpoint(wfile, data_dir=data_dir, tta="flip", device=device)
        cmd = f"reslab eval {spec} --data-dir DATA --json"
        pcfg["accuracy"] = {
            "split": "test", "n": one["n"], "top1": one["top1"], "loss": one["loss"], "command": cmd,
            "top1_flip": flip["top1"], "loss_flip": flip["loss"], "command_flip": f"{cmd} --tta flip",
            "dtype": dtype, "measured_by": f"reslab weights publish (reslab {__version__}, torch {torch.__version__}, "
                                          f"device {device})"}
        written = ckpt.load_weights(wfile)[0]
        ckpt.save_weights(wfile, written, header())  # same tensors, the header now carries the accuracy
    pcfg["sha256"] = sha256_file(wfile)
    pcfg["file_bytes"] = wfile.stat().st_size
    assert json.loads(read_header(wfile)["pretrained_cfg"])["accuracy"] == pcfg["accuracy"]
    config = {"architecture": model_name, "tag": short, "name": name, "num_classes": info.num_classes,
              "model_args": dict(info.model_kwargs), "default": bool(default), "pretrained_cfg": pcfg}
    ckpt.atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    ckpt.atomic_write_text(out_dir / CARD_FILE, model_card(config))
    ckpt.atomic_write_text(out_dir / HUB_CARD_FILE, hub_readme(config))
    say(f"publish: wrote {out_dir} ({WEIGHTS_FILE} {pcfg['file_bytes']} bytes, sha256 {pcfg['sha256'][:16]}...)")
    return config


def hub_readme(config: dict[str, Any]) -> str:
    """The README.md of a tag folder: the Hugging Face Hub front matter and a pointer to the card (model.md)."""
    import yaml

    c = config["pretrained_cfg"]
    front = {"library_name": "reslab", "license": c.get("license", "mit"),
             "tags": ["image-classification", "reslab", c["architecture"]], "metrics": ["accuracy"]}
    if c["dataset"] in DATASET_IDS:
        front["datasets"] = [DATASET_IDS[c["dataset"]]]
    return "\n".join(["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {c['name']}", "",
                      "The model card (data and split, accuracy with its command, recipe, deviations) is "
                      "[model.md](model.md).", ""])


def model_card(config: dict[str, Any]) -> str:
    """The model card (model.md) of a tag folder: use, data, accuracy, recipe, deviations, files."""
    import yaml

    c = config["pretrained_cfg"]
    name, arch, spec = c["name"], c["architecture"], f"{c['architecture']}:{c['tag']}"
    ds = c["dataset"]
    ds_name = DATASET_NAMES.get(ds, ds)
    paper = next((text for prefix, text in PAPERS if arch.startswith(prefix)), None)
    acc = c.get("accuracy")
    lines = [f"# {name}", "",
             f"`{arch}` ({c['params']:,} parameters"
             + (f"; {paper})" if paper else ")") + f" trained with reslab {c['reslab_version']} on {ds_name}.",
             "", "## Use", "", "```python", "import reslab",
             f"model = reslab.create_model({arch!r}, pretrained={name!r}).eval()",
             "```", "",
             f"Input: {c['input_size'][0]}x{c['input_size'][1]}x{c['input_size'][2]} images in [0, 1], normalised "
             f"with mean {c['mean']} and std {c['std']}; {c['num_classes']} classes.", "", "```bash",
             f"reslab eval {spec} --data-dir DATA --json", f"reslab lesion {spec} --data-dir DATA --mode single",
             "```", "", "## Data", "",
             f"Trained on {_split_text(c['train_config'].get('data', {}))} of {c['data_source']}; "
             f"measured on the test split of the same copy.", ""]
    lines += ["## Accuracy", ""]
    if acc:
        lines += ["| metric | value | command |", "|---|---|---|",
                  f"| top-1, single view ({acc['n']:,} test images) | {100 * acc['top1']:.2f}% | `{acc['command']}` |",
                  f"| top-1, flip TTA ({acc['n']:,} test images) | {100 * acc['top1_flip']:.2f}% | "
                  f"`{acc['command_flip']}` |", "",
                  f"Measured on the weights as stored here ({acc['dtype']}) by {acc['measured_by']}; `DATA` is the "
                  f"folder holding the data set. Nothing was selected on the test set (weights: checkpoint "
                  f"`{c['source_checkpoint']}`, step {c['step']})."]
    else:
        lines += ["Not measured: these weights were published without `--data-dir`. Measure them with "
                  f"`reslab eval {spec} --data-dir DATA --json`."]
    if c.get("official_test_command"):
        lines += ["", f"On the official {ds_name} test set (not measured for this card):", "", "```bash",
                  c["official_test_command"], "```"]
    cfg_yaml = yaml.safe_dump(c["train_config"], sort_keys=False, default_flow_style=None).rstrip()
    lines += ["", "## Recipe", "",
              f"`reslab train config.yaml --data-dir DATA --out runs/{c['tag']}` with this resolved config saved as "
              f"`config.yaml` ({c['step']} steps, {c['epoch']} epoch(s); `data_dir` is a placeholder):", "",
              "```yaml", cfg_yaml, "```", "", "## Deviations", ""]
    dev = []
    if c["dtype"] == "float16":
        dev.append("Stored in float16 (loaded into float32 models); the accuracy above is that of the float16 weights.")
    if c.get("weights") == "ema":
        dev.append("These are the run's EMA weights (the ones its evaluation used).")
    if "JPEG" in c["data_source"]:
        dev.append("Trained and measured on a JPEG re-encoding, not the official images: accuracy on the official "
                   "test set may differ slightly (command above).")
    dev += list(c.get("notes") or [])
    lines += [f"- {x}" for x in dev] or ["- None stated."]
    lines += ["", "## Files", "",
              f"- `model.safetensors`: {c.get('file_bytes', 0):,} bytes, sha256 `{c.get('sha256')}`; its header "
              "carries this card's metadata (`pretrained_cfg`, without the file's own sha256) and the reslab "
              "checkpoint fields, so `reslab eval model.safetensors` works on it directly.",
              "- `config.json`: `architecture`, `num_classes`, `model_args` and `pretrained_cfg` (data, mean/std, input "
              "size, accuracy with its commands, the training config, versions, sha256).", ""]
    return "\n".join(lines)


def run_publish(args: argparse.Namespace) -> int:
    cfg = publish(args.run, args.tag, out=args.out, half=args.half, data_dir=args.data_dir, which=args.which,
                  data_source=args.data_source, notes=args.note, default=args.default, url=args.url,
                  device=args.device, force=args.force)
    if args.json:
        print(json.dumps(cfg, indent=1))
        return 0
    c = cfg["pretrained_cfg"]
    acc = c["accuracy"]
    line = (f"top1 {_pct(acc['top1'])} single view, {_pct(acc['top1_flip'])} flip TTA on {acc['n']} test images"
            if acc else "accuracy not measured (no --data-dir)")
    print(f"published {cfg['name']} ({c['dtype']}, sha256 {c['sha256'][:16]}...): {line}")
    return 0
