"""The default alpha-spending schedule of `smoothadv certify --mode sequential` (alpha = 0.001, the standard radii):
its looks, the level spent at each, and the largest certifiable radius, against fixed n = 100,000.

    python experiments/sequential/schedule.py
"""

from __future__ import annotations

from smoothadv.sequential import SequentialConfig
from smoothadv.stats import max_certifiable_radius


def main() -> None:
    alpha = 0.001
    print("| sigma | radii | looks (samples) | level at each look (x alpha) | cap: largest radius (x sigma) |")
    print("|---|---|---|---|---|")
    for sigma in (0.25, 0.5):
        config = SequentialConfig(sigma=sigma)
        looks = ", ".join(f"{n:,}" for n in config.schedule.looks)
        levels = ", ".join(f"{level / alpha:.3g}" for level in config.schedule.levels)
        radii = f"{config.schedule.radii[0]:g} … {config.schedule.radii[-1]:g}"
        cap = max_certifiable_radius(config.schedule.looks[-1], config.schedule.levels[-1], 1.0)
        print(f"| {sigma:g} | {radii} | {looks} | {levels} | {cap:.3f} |")
    print(f"| fixed n | | 100,000 | 1 | {max_certifiable_radius(100_000, alpha, 1.0):.3f} |")


if __name__ == "__main__":
    main()
