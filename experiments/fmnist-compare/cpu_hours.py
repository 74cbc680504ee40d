"""CPU time of the equal-budget comparison, from the log its run.sh writes (results/fmnist-compare/logs/cpu.tsv:
one line per step, name, user and system CPU-seconds, wall seconds).

    python experiments/fmnist-compare/cpu_hours.py     # a Markdown table: training and pi, certifying, total
"""

from __future__ import annotations

import csv
from pathlib import Path

LOG = Path(__file__).resolve().parents[2] / "results" / "fmnist-compare" / "logs" / "cpu.tsv"


def main() -> None:
    totals = {"training (models, CAT-RS prior) and CAT-RS's smoothed prediction": 0.0, "certifying": 0.0}
    steps = {key: 0 for key in totals}
    with open(LOG, newline="") as handle:
        for name, user, system, _wall in csv.reader(handle, delimiter="\t"):
            key = "certifying" if name.startswith("certify_") else next(iter(totals))
            totals[key] += float(user) + float(system)
            steps[key] += 1
    print("| part | steps | CPU-hours (user + system) |")
    print("|---|---:|---:|")
    for key, seconds in totals.items():
        print(f"| {key} | {steps[key]} | {seconds / 3600:.2f} |")
    print(f"| total | {sum(steps.values())} | {sum(totals.values()) / 3600:.2f} |")


if __name__ == "__main__":
    main()
