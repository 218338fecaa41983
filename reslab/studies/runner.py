"""Run a study end to end: plan -> run store -> analyses -> ``report.md`` + ``results.json`` + PNGs.

design.md "The run store": every run a study's plan names is trained (or reused, or resumed) in
the store under its config's key, one lock per run, so several processes (or machines sharing
the store) may run studies that share runs. ``plan_only`` prints the missing runs as
``reslab train`` commands for any launcher; ``collect_only`` builds the report from finished
runs only. With ``pretrained`` a run whose :class:`~reslab.studies.base.RunSpec` names a shipped
weight (``MODEL:TAG``, ``reslab weights list``) uses it instead of training, and the report says so.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from reslab.studies.base import NOT_STATED, jsonable, Plan, RunSpec, Study, StudyContext, StudyResult, check_budget
from reslab.studies.store import FINISHED, PARTIAL, default_store, ensure_run, plan_commands, run_dir, run_state


def _resolve(plan: Plan) -> dict[str, Any]:
    """RunSpec name -> validated TrainConfig (``config_from_dict``); an invalid one names the run."""
    from reslab.train import config_from_dict

    cfgs: dict[str, Any] = {}
    for spec in plan.runs:
        try:
            cfgs[spec.name] = config_from_dict(dict(spec.config))
        except ValueError as e:
            raise ValueError(f"study {plan.study} ({plan.budget}), run {spec.name!r}: {e}") from None
    return cfgs


def _concrete_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_pretrained(spec: RunSpec) -> str:
    """``spec.pretrained`` after checking that the weights are registered and present (sha256)."""
    from reslab.weights import fetch, get_entry

    assert spec.pretrained is not None
    fetch(get_entry(spec.pretrained))
    return spec.pretrained


def _versions() -> dict[str, Any]:
    from reslab import __version__

    out: dict[str, Any] = {"reslab": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "numpy"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    try:
        from reslab.train.logging import git_revision

        out["git"] = git_revision()
    except Exception:  # pragma: no cover - the report does not need git
        out["git"] = {}
    return out


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _figures_into(out: Path, figures: list[Path]) -> list[Path]:
    """The figures as paths relative to ``out``, copying any written elsewhere into ``out``."""
    rel = []
    for f in figures:
        f = Path(f)
        if not f.is_absolute() and not f.exists() and (out / f).exists():
            f = out / f
        try:
            rel.append(f.resolve().relative_to(out.resolve()))
        except ValueError:
            shutil.copy2(f, out / f.name)
            rel.append(Path(f.name))
    return rel


def analysis_key(study: Study, plan: Plan, records: list[dict[str, Any]], device: str) -> str:
    """Hash of what the analyses depend on: study, budget, options, the runs (store keys or shipped
    tags), the device type and the reslab version. Same key: the cached analysis is reused."""
    import hashlib

    from reslab import __version__

    blob = json.dumps(jsonable({"study": study.name, "budget": plan.budget, "options": dict(plan.options),
                                 "data": plan.data, "runs": sorted((r["name"], r["action"] == "pretrained",
                                                                    r.get("key") or r["where"]) for r in records),
                                 "device": device.split(":")[0], "reslab": __version__}), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _save_analysis(folder: Path, result: StudyResult, figures: list[Path], out: Path, analyse_s: float) -> None:
    """Keep ``result`` and its figures in the store (``STORE/analyses/<study>-<budget>-<key>``)."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in figures:
        dst = tmp / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / f, dst)
    doc = {"results": result.results, "sections": result.sections, "figures": [f.as_posix() for f in figures],
           "comparisons": [dict(what=c.what, measured=c.measured, paper=c.paper, source=c.source, note=c.note)
                           for c in result.comparisons],
           "trends": [list(t) for t in result.trends], "analyse_time_s": analyse_s,
           "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    (tmp / "analysis.json").write_text(json.dumps(jsonable(doc), indent=1) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached the same analysis first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _load_analysis(folder: Path, out: Path) -> tuple[StudyResult, list[Path], dict[str, Any]] | None:
    """The cached analysis in ``folder`` (figures copied into ``out``), or None."""
    from reslab.studies.base import Comparison

    f = folder / "analysis.json"
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text())
        figures = [Path(p) for p in doc["figures"]]
        for p in figures:
            (out / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / p, out / p)
        result = StudyResult(results=doc["results"], sections=list(doc["sections"]), figures=[out / p for p in figures],
                             comparisons=[Comparison(**c) for c in doc["comparisons"]],
                             trends=[tuple(t) for t in doc["trends"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable cache: recompute
    return result, figures, doc


def _report(study: Study, plan: Plan, result: StudyResult, runs: list[dict[str, Any]], figures: list[Path],
            wall_s: float, created: str, store: Path, analysis: dict[str, Any] | None = None) -> str:
    from reslab import __version__

    lines = [f"# {study.title or study.name}", "", f"Paper: {study.paper or NOT_STATED}", "",
             f"Study `{study.name}`, budget `{plan.budget}`, data `{plan.data}`; reslab {__version__}; "
             f"{created}; total wall time {wall_s:.1f} s.", ""]
    lines += ["## Runs", ""]
    if runs:
        lines += [f"Run store: `{store}`.", "",
                  "| run | model | what this study did | run directory / weights | wall time |",
                  "|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {_cell(r['name'])} | {_cell(r['model'])} | {r['action']} | `{_cell(r['where'])}` | "
                         f"{r['seconds']:.1f} s |")
        if any(r["action"] == "pretrained" for r in runs):
            lines += ["", "*pretrained*: shipped weights (`reslab weights list`) used instead of training the run; "
                          "see their model card for what they were trained and measured on."]
    else:
        lines.append("No training runs: this study computes everything it reports.")
    if analysis is not None:
        if analysis["action"] == "reused":
            lines += ["", f"Analyses: reused from the store (`analyses/...-{analysis['key']}`, computed "
                          f"{analysis.get('computed')} in {analysis.get('compute_time_s') or 0:.1f} s; "
                          f"`--recompute` redoes them)."]
        else:
            lines += ["", f"Analyses: computed in {analysis['compute_time_s']:.1f} s (kept in the store as "
                          f"`analyses/...-{analysis['key']}`)."]
    lines += ["", "## What differs from the paper", ""]
    lines += [f"- {d}" for d in plan.deviations] or ["- none stated"]
    lines += ["", "## Paper vs measured", ""]
    if result.comparisons:
        lines += ["| what | measured | paper | source | note |", "|---|---|---|---|---|"]
        for c in result.comparisons:
            lines.append(f"| {_cell(c.what)} | {_cell(c.measured)} | {_cell(c.paper or NOT_STATED)} | "
                         f"{_cell(c.source or NOT_STATED)} | {_cell(c.note)} |")
    else:
        lines.append("No comparisons.")
    if result.trends:
        lines += ["", "## Trends the paper states", "", "| stated trend | shows here? | evidence |", "|---|---|---|"]
        for trend, shows, evidence in result.trends:
            mark = "unclear" if shows is None else ("yes" if shows else "no")
            lines.append(f"| {_cell(trend)} | {mark} | {_cell(evidence)} |")
    for s in result.sections:
        lines += ["", s.rstrip()]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{f.stem}]({f.as_posix()})" for f in figures]
    lines += ["", "Every number above is in `results.json`."]
    return "\n".join(lines) + "\n"


def run_study(study: Study, budget: str, *, store: str | os.PathLike | None = None,
              out: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
              device: str = "auto", plan_only: bool = False, collect_only: bool = False, pretrained: bool = False,
              recompute: bool = False, progress: Callable[[str], None] = print) -> Path | list[str]:
    """Run ``study`` at ``budget`` and write its report; returns the output folder.

    Args:
        study: a :class:`~reslab.studies.base.Study`.
        budget: ``smoke``, ``laptop`` or ``paper``.
        store: the run store (default :func:`~reslab.studies.store.default_store`).
        out: output folder (default ``./study_<name>_<budget>``): ``report.md``, ``results.json``, PNGs.
        data_dir: sets ``data.data_dir`` of every run (and ``StudyContext.data_dir``).
        device: ``train.device`` of the runs trained here and the analyses' device (``auto``: CUDA if present).
        plan_only: return (without training) the ``reslab train`` commands of the runs not finished.
        collect_only: train nothing; a ValueError names the runs not finished yet.
        pretrained: runs whose RunSpec names a shipped weight use it instead of training.
        recompute: redo the analyses even when the store holds them for the same runs and options
            (``STORE/analyses``: a second run of a study trains nothing and analyses nothing).
        progress: where progress lines go.
    """
    if plan_only and collect_only:
        raise ValueError("--plan and --collect exclude each other; give one")
    check_budget(budget)
    t0 = time.monotonic()
    plan = study.plan(budget)
    cfgs = _resolve(plan)
    store_p = Path(store).expanduser() if store is not None else default_store()
    use_weights = {s.name for s in plan.runs if pretrained and s.pretrained}
    to_train = [s for s in plan.runs if s.name not in use_weights]
    label = f"study {study.name} ({budget})"

    if plan_only:
        cmds = plan_commands(store_p, [cfgs[s.name] for s in to_train], data_dir,
                             progress=lambda m: progress(f"{label}: {m}"))
        progress(f"{label}: {len(cmds)} of {len(to_train)} runs to train" + (" (all finished)" if not cmds else ""))
        return cmds

    runs: dict[str, str] = {}
    source: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    for spec in plan.runs:
        if spec.name in use_weights:
            runs[spec.name], source[spec.name] = _check_pretrained(spec), "pretrained"
            records.append(dict(name=spec.name, model=cfgs[spec.name].model.name, action="pretrained",
                                where=spec.pretrained, seconds=0.0))
            progress(f"{label}: {spec.name}: pretrained weights {spec.pretrained}")
    if collect_only:
        states = {s.name: run_state(run_dir(store_p, cfgs[s.name]), cfgs[s.name]) for s in to_train}
        missing = [n for n, st in states.items() if st != FINISHED]
        if missing:
            partial = sum(states[n] == PARTIAL for n in missing)
            where = f" --store {store_p}" if store is not None else ""
            raise ValueError(f"{len(missing)} runs missing ({', '.join(missing)}"
                             f"{f'; {partial} partly trained' if partial else ''}) in {store_p}; run them with "
                             f"`reslab study {study.name} --budget {budget}{where} --plan` (or without --collect)")
    for i, spec in enumerate(to_train, 1):
        cfg = cfgs[spec.name]
        if collect_only:
            path, action, secs = run_dir(store_p, cfg), "reused", 0.0
        else:
            progress(f"{label}: run {i}/{len(to_train)} {spec.name} ({cfg.model.name})")
            o = ensure_run(store_p, cfg, data_dir=data_dir, device=device,
                           progress=lambda m, n=spec.name: progress(f"{label}: {n}: {m}"))
            path, action, secs = o.path, o.action, o.seconds
        runs[spec.name], source[spec.name] = str(path), action
        records.append(dict(name=spec.name, model=cfg.model.name, action=action, where=str(path), seconds=secs,
                            key=path.name))
        progress(f"{label}: {spec.name}: {action} {path} ({secs:.1f} s)")
    order = {s.name: i for i, s in enumerate(plan.runs)}
    records.sort(key=lambda r: order[r["name"]])

    out_p = Path(out) if out is not None else Path(f"study_{study.name}_{budget}")
    out_p.mkdir(parents=True, exist_ok=True)
    ctx = StudyContext(plan=plan, runs=runs, source=source, out=out_p,
                       data_dir=str(data_dir) if data_dir is not None else None,
                       device=_concrete_device(device), progress=progress)
    akey = analysis_key(study, plan, records, ctx.device)
    cache = store_p / "analyses" / f"{study.name}-{budget}-{akey}"
    cached = None if recompute else _load_analysis(cache, out_p)
    if cached is not None:
        result, figures, meta = cached
        analyse_s = 0.0
        analysis = {"action": "reused", "key": akey, "computed": meta.get("created"),
                    "compute_time_s": meta.get("analyse_time_s")}
        progress(f"{label}: analyses reused from {cache} (computed {meta.get('created')}, "
                 f"{meta.get('analyse_time_s', 0):.1f} s then); --recompute redoes them")
    else:
        progress(f"{label}: analysing")
        t_an = time.monotonic()
        result = study.analyse(ctx)
        analyse_s = time.monotonic() - t_an
        figures = _figures_into(out_p, list(result.figures))
        _save_analysis(cache, result, figures, out_p, analyse_s)
        analysis = {"action": "computed", "key": akey, "compute_time_s": analyse_s}
    wall_s = time.monotonic() - t0
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    doc = {
        "study": study.name, "title": study.title, "paper": study.paper, "budget": budget, "data": plan.data,
        "created": created, "wall_time_s": wall_s, "analyse_time_s": analyse_s, "store": str(store_p),
        "device": ctx.device, "data_dir": ctx.data_dir, "options": dict(plan.options), "analysis": analysis,
        "deviations": list(plan.deviations), "runs": records,
        "results": result.results,
        "comparisons": [dict(what=c.what, measured=c.measured, paper=c.paper or NOT_STATED, source=c.source,
                             note=c.note) for c in result.comparisons],
        "trends": [dict(trend=t, shows=s, evidence=e) for t, s, e in result.trends],
        "paper_values": [dict(key=v.key, what=v.what, value=v.value, shown=v.shown(), source=v.source, unit=v.unit)
                         for v in study.paper_values()],
        "figures": [f.as_posix() for f in figures],
        "versions": _versions(),
    }
    (out_p / "results.json").write_text(json.dumps(jsonable(doc), indent=1) + "\n")
    (out_p / "report.md").write_text(_report(study, plan, result, records, figures, wall_s, created, store_p,
                                             analysis))
    progress(f"{label}: wrote {out_p / 'report.md'} and results.json ({wall_s:.1f} s in all)")
    return out_p


__all__ = ["run_study"]
