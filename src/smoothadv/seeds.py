"""Randomness: one convention for every call, and one home for the seed mixers.

The convention (what each call takes; all draws are reproducible from it)
--------------------------------------------------------------------------

- `generator=`: one `torch.Generator` for a call on one input or one batch: `Smooth.predict`,
  `Smooth.certify`, `Smooth.sample_counts`, `sequential.certify_sequential`, an attack call
  `attack(model, x, y, generator)`, an objective call `objective(model, x, y, generator=...)`.
  None (the default) draws from torch's global generator, as Cohen's code and torch do: seed it
  with `torch.manual_seed` for reproducible runs.
- `generators=`: one generator per input for a call on several inputs (`Smooth.certify_many`), so
  input i's result is the one `generator=generators[i]` gives it alone, whatever it is packed with.
- `seed=`: an integer, for the drivers that walk a dataset (`evaluate.certify_dataset`,
  `predict_dataset`, `sequential.certify_sequential_dataset`, the CLI's `--seed`): each example's
  generator is made from (seed, dataset index) by `example_generator`, so a row does not depend on
  which other examples ran, in which order, on how many shards or after how many resumptions.

Devices: a generator draws on its own device, and torch refuses to draw a CUDA tensor from a CPU
generator. Make it where the inputs are: `torch.Generator(device=x.device).manual_seed(0)`;
`Smooth` refuses a generator on another device than x in one line. The same seed gives other
draws on CPU and on CUDA (torch's generators differ), so a result is reproducible on one device type.

Two streams from one generator (sequential certification): `certify_sequential(..., generator=g)`
draws one integer `base` from g (`torch.randint(0, 2**62, (1,), generator=g)`) and seeds two fresh
generators on x's device, selection with `example_seed(base, 0)` and estimation with
`example_seed(base, 1)` (`split_generator`): the class is chosen from one stream and its probability
bounded from an independent one, as CERTIFY's n0 and n samples are. Without a generator both come
from the global generator (selection first). The lower-level
`sequential.certify_sequential_many(..., selection_generators=, estimation_generators=)` takes the
two streams of each input explicitly; the dataset driver seeds them with `stream_seed(seed, index, 0)`
and `stream_seed(seed, index, 1)`.

Objectives take a `noise.NoiseSource` as `generator`: a torch generator, None, or a `noise.RowNoise`
(one row of noise per batch example, e.g. `distributed.RankSlicedNoise` under torchrun, so an
example's noise does not depend on the number of processes; its `local` generator draws the rest).
In your own loop, pass a `torch.Generator` or nothing.

The mixers
----------

Every result smoothadv writes is reproducible from a seed because each random stream has its own
generator, seeded by a pure function of (seed, what the stream is for):

- `example_seed(seed, index)`: the noise of evaluation example `index` (certify, predict, attack).
  `example_generator` is that generator.
- `stream_seed(seed, index, stream)`: the separate streams of one example in sequential
  certification (0: selection, 1: estimation), `example_seed` applied twice.
- `derive_seed(seed, *keys)`: the training streams per (epoch, rank, purpose), splitmix64 mixing,
  so a resumed or restarted run draws exactly what an uninterrupted one would.

The two mixers differ because results were published with each; changing either would change
every committed row or checkpoint, so they are kept exactly and tested for their values.
"""

from __future__ import annotations

import torch

__all__ = ["derive_seed", "example_generator", "example_seed", "split_generator", "stream_seed"]

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


def split_generator(generator: torch.Generator, device: torch.device | str) -> tuple[torch.Generator, torch.Generator]:
    """Two independent generators on `device` (selection, estimation) from one draw of `generator`.

    Draws one integer base in [0, 2**62) from `generator` and seeds the two with `example_seed(base, 0)` and
    `example_seed(base, 1)`: how `sequential.certify_sequential(..., generator=)` splits its generator."""
    base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return (torch.Generator(device=device).manual_seed(example_seed(base, 0)),
            torch.Generator(device=device).manual_seed(example_seed(base, 1)))


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
