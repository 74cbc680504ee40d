"""Floating point and randomness: the noise is Gaussian enough not to bias counts, seeds reproduce runs, and low
precision cannot silently change what is certified.

Tolerances: moment and frequency checks allow 5 standard errors of the statistic at the stated sample size (a
false alarm probability below 1e-6 each); seeds are fixed, so every outcome is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest, norm
from torch import Tensor, nn

from smoothadv import Smooth, SmoothAdvError
from smoothadv.smoothing import NoisySampler, PackedSampler, SampleRequest, noise_pieces


class Recorder(nn.Module):
    """A 2-class base classifier that keeps every input batch it sees (for inspecting the noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        s = x.flatten(1).float().sum(1)
        return torch.stack([-s, s], dim=1)


def sampler_noise(x: Tensor, n: int, batch: int, sigma: float, seed: int) -> Tensor:
    model = Recorder()
    NoisySampler(model, 2, sigma).counts(x, n, batch, torch.Generator().manual_seed(seed))
    return (torch.cat(model.seen) - x.to(torch.cat(model.seen).dtype)).flatten(1)


def test_cpu_gaussian_moments_symmetry_and_tails() -> None:
    sigma, n = 0.5, 2_000_000
    z = torch.empty(n).normal_(0.0, sigma, generator=torch.Generator().manual_seed(0)).double().numpy() / sigma
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(np.mean(z ** 3)) < 5 * math.sqrt(15) * se            # skewness 0 (var of z^3 is 15)
    assert abs(np.mean(z ** 4) - 3) < 5 * math.sqrt(96) * se        # kurtosis 3 (var of z^4 is 96)
    assert abs(np.mean(z > 0) - 0.5) < 5 * 0.5 * se                 # symmetry
    for t in (1.0, 2.0, 3.0, 4.0):  # the tails decide p_A near 1, i.e. large radii
        q = norm.sf(t)
        assert abs(np.mean(z > t) - q) < 5 * math.sqrt(q * (1 - q) / n) + 1e-12, t
        assert abs(np.mean(z < -t) - q) < 5 * math.sqrt(q * (1 - q) / n) + 1e-12, t
    assert kstest(z[:200_000], "norm").pvalue > 1e-4


def test_sampler_noise_is_gaussian_iid_and_not_repeated_across_batches() -> None:
    x = torch.full((3, 4, 4), 0.5)
    noise = sampler_noise(x, 20_000, 1_000, 0.25, seed=1).double()  # 20 batches of 1000
    z = noise.numpy().ravel() / 0.25
    assert abs(z.mean()) < 5 / math.sqrt(z.size) and abs(z.var() - 1) < 5 * math.sqrt(2 / z.size)
    # consecutive batches must be fresh draws: no repeated buffer, correlation ~ 0
    first, second = noise[:1000].ravel(), noise[1000:2000].ravel()
    corr = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(first.numel())
    assert len(torch.unique(noise, dim=0)) == noise.shape[0]  # no sample repeated
    # pixels within one sample are independent too
    pix = float(torch.corrcoef(noise[:, :2].T)[0, 1])
    assert abs(pix) < 5 / math.sqrt(noise.shape[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gaussian_moments() -> None:
    n = 2_000_000
    z = torch.empty(n, device="cuda").normal_(generator=torch.Generator("cuda").manual_seed(0)).double().cpu().numpy()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se and abs(z.var() - 1) < 5 * math.sqrt(2) * se
    for t in (2.0, 3.0):
        q = norm.sf(t)
        assert abs(np.mean(z > t) - q) < 5 * math.sqrt(q * (1 - q) / n)


def test_seeds_reproduce_and_differ() -> None:
    from conftest import LinearBinary

    w = torch.zeros(1, 4, 4)
    w[0, 0, 0] = 1.0
    smooth = Smooth(LinearBinary(w, -0.5), 2, 0.25)
    x = torch.full((1, 4, 4), 0.5)
    x[0, 0, 0] = 0.6

    def run(seed: int) -> tuple:
        cert = smooth.certify(x, 20, 5000, 0.01, 700, generator=torch.Generator().manual_seed(seed))
        return cert.prediction, cert.radius, cert.count

    assert run(3) == run(3)
    assert run(3) != run(4)
    torch.manual_seed(9)
    a = smooth.predict(x, 500, 0.01, 100), smooth.certify(x, 10, 500, 0.01, 100).count
    torch.manual_seed(9)
    b = smooth.predict(x, 500, 0.01, 100), smooth.certify(x, 10, 500, 0.01, 100).count
    assert a == b  # the global generator, when no generator is passed, is reproducible too


def test_counts_do_not_depend_on_batch_size_or_packing() -> None:
    model = Recorder()
    sampler = NoisySampler(model, 2, 0.3)
    x = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    ref = sampler.counts(x, 997, 997, torch.Generator().manual_seed(5))
    for batch in (1000, 4096):
        assert torch.equal(sampler.counts(x, 997, batch, torch.Generator().manual_seed(5)), ref)
    y = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1))
    packed = PackedSampler(sampler).counts([SampleRequest(y, (50,), torch.Generator().manual_seed(6)),
                                            SampleRequest(x, (997,), torch.Generator().manual_seed(5))], 2000)
    assert torch.equal(packed[1], ref)


class Spread(Recorder):
    """A 4-class base classifier with varied votes under noise (fixed weights); records its input batches."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        return x.flatten(1) @ self.weight


def test_noise_pieces_are_batches_of_one_stream_split_at_segment_ends() -> None:
    assert list(noise_pieces((5, 37), 16)) == [(16, [(0, 5), (1, 11)]), (16, [(1, 16)]), (10, [(1, 10)])]
    assert list(noise_pieces((0, 3, 0), 16)) == [(3, [(1, 3)])]
    assert list(noise_pieces((), 16)) == []


def test_packed_sampler_gives_the_plain_sampler_counts_bit_for_bit() -> None:
    # Several inputs with one or several segments (CERTIFY's n0 + n, sequential looks), packed into full batches
    # of 48: pieces straddle batches (drawn in the staging buffer) or fit (drawn in place). Each request's counts
    # and noisy samples are exactly those of the plain single-input loop with the same generator.
    shape = (3, 4, 4)
    xs = [torch.rand(shape, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    segments = [(5, 37), (64,), (0, 3, 100), (130, 1), (7,)]
    batch = 48
    packed_model = Spread()
    packed = PackedSampler(NoisySampler(packed_model, 4, 0.5)).counts(
        [SampleRequest(x, seg, torch.Generator().manual_seed(10 + i)) for i, (x, seg) in enumerate(zip(xs, segments))],
        batch)
    plain_model = Spread()
    plain = NoisySampler(plain_model, 4, 0.5)
    rows = [plain.segment_counts(x, seg, batch, torch.Generator().manual_seed(10 + i))
            for i, (x, seg) in enumerate(zip(xs, segments))]
    assert torch.equal(packed, torch.cat(rows))
    assert [int(r.sum()) for r in packed] == [n for seg in segments for n in seg]
    assert len(set(packed.argmax(1).tolist())) > 1  # the votes really vary
    # same noisy samples in the same order; every packed forward batch but the last is full
    assert torch.equal(torch.cat(packed_model.seen), torch.cat(plain_model.seen))
    sizes = [len(b) for b in packed_model.seen]
    assert all(size == batch for size in sizes[:-1]) and sum(sizes) == sum(map(sum, segments))
    # the plain loop's batches are the pieces of each input's stream (Cohen's min(batch_size, remaining))
    assert [len(b) for b in plain_model.seen] == [size for seg in segments for size, _ in noise_pieces(seg, batch)]
    assert torch.equal(plain.counts(xs[1], 64, batch, torch.Generator().manual_seed(11)), packed[2])


def test_low_precision_input_still_gets_float32_gaussian_noise() -> None:
    x16 = torch.full((1, 4, 4), 0.3, dtype=torch.float16)
    model = Recorder()
    NoisySampler(model, 2, 0.25).counts(x16, 4000, 4000, torch.Generator().manual_seed(2))
    seen = model.seen[0]
    assert seen.dtype == torch.float32  # not quantized to the float16 grid
    z = ((seen - x16.float()) / 0.25).double().numpy().ravel()
    assert len(np.unique(seen.numpy())) > 0.99 * seen.numel()
    assert abs(z.mean()) < 5 / math.sqrt(z.size) and abs(z.var() - 1) < 5 * math.sqrt(2 / z.size)


def test_bf16_autocast_base_sees_float32_noise_and_is_what_is_certified() -> None:
    from smoothadv.accel import prepare_base

    inner = Recorder()
    base = prepare_base(inner, "cpu", "bf16")
    smooth = Smooth(base, 2, 0.25)
    x = torch.full((1, 4, 4), 0.5)
    gen = torch.Generator().manual_seed(0)
    counts = smooth.sample_counts(x, 1000, 1000, generator=gen)
    assert inner.seen[0].dtype == torch.float32  # noise added in float32; only f's arithmetic is bf16
    # the votes are exactly those of f_bf16 (the wrapped model) on the same noisy inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        votes = inner(inner.seen[0]).float().argmax(1)
    assert counts.tolist() == torch.bincount(votes, minlength=2).tolist()


def test_nan_logits_are_an_error_not_votes() -> None:
    class Overflow(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            out = torch.zeros(len(x), 3)
            out[::7, 1] = float("nan")  # what a float16 overflow (inf - inf) produces
            return out

    smooth = Smooth(Overflow(), 3, 0.25)
    x = torch.full((1, 2, 2), 0.5)
    for call in (lambda: smooth.certify(x, 10, 100, 0.01, 50), lambda: smooth.predict(x, 100, 0.01, 50)):
        with pytest.raises(SmoothAdvError, match="NaN logits"):
            call()


def test_seed_mixers_keep_their_values() -> None:
    """Committed rows and checkpoints depend on these exact streams (seeds.py): their values are pinned."""
    from smoothadv.seeds import derive_seed, example_seed, stream_seed

    assert example_seed(0, 0) == 1
    assert example_seed(5, 17) == (5 * 0x9E3779B97F4A7C15 + 17 * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
    assert stream_seed(5, 17, 1) == example_seed(example_seed(5, 17), 1)
    assert [derive_seed(0, 1), derive_seed(3, 1, 2)] == [4440719029848649959, 1586121690876248329]
    assert derive_seed(0, 0, 0) != derive_seed(0, 0) and derive_seed(1, 2) != derive_seed(2, 1)
    assert {derive_seed(7, e, r, k) for e in range(4) for r in range(4) for k in range(3)}.__len__() == 48
