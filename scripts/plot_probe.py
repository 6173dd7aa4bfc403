"""Remake a run's displacement figure from its per-example probe table.

python scripts/plot_probe.py outputs/<date>/<time>            # writes <run dir>/probe.png
python scripts/plot_probe.py outputs/<date>/<time> --out fig.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpo_lab.plots import plot_probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a dpo_lab run dir holding probe.csv")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: run dir)")
    args = parser.parse_args(argv)
    table = args.run_dir / "probe.csv"
    if not table.is_file():
        print(
            f"plot_probe: error: {table} not found (is {args.run_dir} a dpo_lab run dir?)",
            file=sys.stderr,
        )
        return 2
    print(plot_probe(table, args.out or args.run_dir / "probe.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
