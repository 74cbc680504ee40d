"""Where every random stream comes from: one home for the seed mixers.

Every result smoothadv writes is reproducible from a seed because each random stream has its own
generator, seeded by a pure function of (seed, what the stream is for):

- `example_seed(seed, index)`: the noise of evaluation example `index` (certify, predict, attack).
  A row therefore does not depend on which other examples ran, in which order, on how many
  shards or after how many resumptions. `example_generator` is that generator.
- `stream_seed(seed, index, stream)`: the separate streams of one example in sequential
  certification (0: selection, 1: estimation), `example_seed` applied twice.
- `derive_seed(seed, *keys)`: the training streams per (epoch, rank, purpose), splitmix64 mixing,
  so a resumed or restarted run draws exactly what an uninterrupted one would.

The two mixers differ because results were published with each; changing either would change
every committed row or checkpoint, so they are kept exactly and tested for their values.
"""

from __future__ import annotations

import torch

__all__ = ["derive_seed", "example_generator", "example_seed", "stream_seed"]

_MASK = (1 << 63) - 1


def example_seed(seed: int, index: int) -> int:
    """The noise seed of dataset example `index` under a global `seed` (independent of order and sharding)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def example_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `example_seed(seed, index)`."""
    return torch.Generator(device=device).manual_seed(example_seed(seed, index))


def stream_seed(seed: int, index: int, stream: int) -> int:
    """The seed of noise stream `stream` (0: selection, 1: estimation) of example `index` under `seed`."""
    return example_seed(example_seed(seed, index), stream)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from `seed` and integer `keys` (splitmix64 mixing; distinct keys -> unrelated seeds)."""
    state = int(seed) & _MASK
    for key in (*keys, len(keys)):
        state = (state + 0x9E3779B97F4A7C15 + (int(key) & _MASK) * 0xD1B54A32D192ED03) & ((1 << 64) - 1)
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
        state = z ^ (z >> 31)
    return state & _MASK
