"""The distribution of the certified radius per method (results/fmnist-compare/radius_cdf.png): certified accuracy
with its 95% interval beside the empirical CDF of each model's certified radius (`report.plot_radius_cdf`).

    python experiments/fmnist-compare/radius_cdf.py
"""

from __future__ import annotations

from pathlib import Path

from smoothadv.report import load_results, plot_radius_cdf

HERE = Path(__file__).resolve().parents[2] / "results" / "fmnist-compare"
METHODS = ("gaussian", "stability", "consistency", "smoothadv", "smoothmix", "catrs", "macer", "consistency_adv")


def main() -> None:
    results = {name: load_results(HERE / f"{name}.tsv") for name in METHODS if (HERE / f"{name}.tsv").exists()}
    out = plot_radius_cdf(results, HERE / "radius_cdf.png", max_radius=1.0,
                          title="Fashion-MNIST, LeNet, sigma = 0.25, 3 epochs per method")
    print(f"wrote {out.relative_to(HERE.parents[1])}")


if __name__ == "__main__":
    main()
