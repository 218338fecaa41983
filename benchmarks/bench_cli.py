"""Start-up time of the command line: does `reslab models` answer at once?

Runs each command in a fresh process (``python -m reslab ...``, as the ``reslab`` script does) a few
times, interleaved, and prints the median wall time of each and whether it stays under the 1 s target
(issue 11: `reslab models` in under a second; it reads the package's complexity table and does not
import torch), beside two references: the bare interpreter and ``import torch``. ``--json`` prints one
object ``{"commands": {...: seconds}, "references": {...}, "target_s": 1.0, "ok": ...}``.

    python benchmarks/bench_cli.py [--runs 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS: dict[str, list[str]] = {
    "reslab --version": ["-m", "reslab", "--version"],
    "reslab models": ["-m", "reslab", "models"],
    "reslab models cifar_*": ["-m", "reslab", "models", "cifar_*"],
}
# References (not held to the target): the bare interpreter, and the torch import the CLI avoids.
REFERENCES: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import torch'": ["-c", "import torch"],
}
TARGET_S = 1.0


def wall_time(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs of each command (interleaved rounds; median)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    every = {**COMMANDS, **REFERENCES}
    times: dict[str, list[float]] = {name: [] for name in every}
    for _ in range(args.runs):
        for name, cmd in every.items():
            times[name].append(wall_time(cmd))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cmds = {k: med[k] for k in COMMANDS}
    refs = {k: med[k] for k in REFERENCES}
    ok = all(t < TARGET_S for t in cmds.values())
    if args.json:
        print(json.dumps({"commands": cmds, "references": refs, "runs": args.runs, "target_s": TARGET_S, "ok": ok}))
    else:
        for name, t in med.items():
            print(f"{name:<26} {t:6.3f} s  (median of {args.runs})")
        print(f"reslab commands under {TARGET_S:g} s: {'yes' if ok else 'NO'} (a loaded machine slows the bare "
              f"interpreter too: compare with the references)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
