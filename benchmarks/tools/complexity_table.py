"""Regenerate or check ``reslab/models/complexity_table.json``, the table `reslab models` reads.

    python benchmarks/tools/complexity_table.py --write    # count every registered model, write the table
    python benchmarks/tools/complexity_table.py --check    # recount and list the rows that differ (exit 1)
    python benchmarks/tools/complexity_table.py --update   # count only models missing from the table

Run ``--write`` after adding or changing a registered model (tests/test_cli_models.py fails until then).
Counting all models takes about a minute on a quiet CPU (one line per model on stderr).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help="count every registered model and write the table")
    g.add_argument("--check", action="store_true", help="count every registered model and compare")
    g.add_argument("--update", action="store_true", help="count only the registered models missing from the table "
                   "(and drop rows of unregistered ones)")
    p.add_argument("--out", help="table path (default: the package's reslab/models/complexity_table.json)")
    args = p.parse_args(argv)
    from reslab.models.complexity import check_table, update_table, write_table

    if args.update:
        added = update_table(args.out, progress=None)
        print(f"added {', '.join(added) if added else 'nothing'}")
        return 0
    if args.write:
        print(f"wrote {write_table(args.out, progress=None)}")
        return 0
    problems = check_table(args.out, progress=None)
    for line in problems:
        print(line)
    print("table up to date" if not problems else f"{len(problems)} problems; run with --write")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
