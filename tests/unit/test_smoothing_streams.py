"""The sampler's plumbing, where a slip changes the votes silently: the noise stream served in pieces (including
the chunked path other devices take), reused buffers of the right shape, dtype and device, and the input checks
that guard the domain. Each test states the value it expects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smoothadv.errors import SmoothAdvError
from smoothadv.smoothing import (
    CHUNK_VALUES,
    NORMAL_BLOCK,
    NoiseStream,
    NoisySampler,
    PackedSampler,
    SampleRequest,
    check_image,
    check_sample_args,
)


def sampler(classes: int = 3, sigma: float = 0.5) -> NoisySampler:
    torch.manual_seed(0)
    return NoisySampler(nn.Sequential(nn.Flatten(), nn.LazyLinear(classes)), classes, sigma)


def served(stream: NoiseStream, pieces: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.cat([stream.fill(torch.empty((size, *like.shape), dtype=like.dtype)).clone() for size in pieces])


@pytest.mark.parametrize("shape", [(1, 3, 3), (1, 4, 4), (3, 5, 7)])
def test_the_chunked_stream_of_other_devices_is_canonical_chunks_served_in_any_pieces(shape) -> None:
    """Off the CPU the stream is drawn in chunks of max(1, CHUNK_VALUES // width) samples, whatever the pieces asked
    for: pieces 3, 7, 1, chunk + 2 give exactly the rows of consecutive chunks drawn whole, plus x."""
    x = torch.rand(shape, dtype=torch.float64)
    s = sampler()
    size = x.numel()
    width = -(-size // NORMAL_BLOCK) * NORMAL_BLOCK
    chunk = CHUNK_VALUES // width
    pieces = [3, 7, 1, chunk + 2]
    stream = NoiseStream(s, x, torch.Generator().manual_seed(5))
    stream.cpu = False  # the path of CUDA and other devices, whose samplers depend on each draw's size
    assert stream.chunk == chunk
    got = served(stream, pieces, x)
    gen = torch.Generator().manual_seed(5)
    whole = torch.cat([torch.empty((chunk, size), dtype=x.dtype).normal_(0.0, 0.5, generator=gen) for _ in range(2)])
    expected = whole[:sum(pieces)].view(-1, *shape) + x
    assert torch.equal(got, expected)
    assert stream.left is not None and len(stream.left) == 2 * chunk - sum(pieces)  # the rest of chunk two, kept


def test_an_input_wider_than_a_chunk_is_drawn_one_sample_at_a_time() -> None:
    # the chunk size is part of every stream recorded off the CPU (a seed's certificates there): it stays 2**20
    assert CHUNK_VALUES == 2**20
    x = torch.zeros(1, 1, CHUNK_VALUES + 1)
    stream = NoiseStream(sampler(), x, None)
    assert stream.chunk == 1


@pytest.mark.parametrize("shape", [(1, 3, 3), (1, 4, 4)])
def test_the_cpu_stream_does_not_depend_on_the_pieces(shape) -> None:
    x = torch.rand(shape)
    s = sampler()
    one = served(NoiseStream(s, x, torch.Generator().manual_seed(2)), [40], x)
    many = served(NoiseStream(s, x, torch.Generator().manual_seed(2)), [1, 13, 2, 24], x)
    assert torch.equal(one, many)


def test_reused_buffers_follow_the_shape_the_rows_and_the_dtype_asked_for() -> None:
    """One sampler serving inputs of several shapes, batch sizes and dtypes in turn gives every input the counts
    a fresh sampler gives it (a buffer kept from an earlier call is never served at the wrong size or type)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4, 3))
    shared = NoisySampler(base, 3, 0.4)
    calls = [((1, 3, 3), 5, torch.float32), ((1, 3, 3), 17, torch.float32), ((1, 5, 5), 9, torch.float32),
             ((1, 3, 3), 30, torch.float64), ((1, 3, 3), 30, torch.float32), ((1, 4, 4), 12, torch.float32)]
    for shape, batch, dtype in calls:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        with torch.no_grad():
            base.to(dtype)
            ours = shared.segment_counts(x, (7, 40), batch, torch.Generator().manual_seed(3))
            fresh = NoisySampler(base, 3, 0.4).segment_counts(x, (7, 40), batch, torch.Generator().manual_seed(3))
        assert torch.equal(ours, fresh), (shape, batch, dtype)
    base.float()


def test_buffers_are_served_on_the_device_and_in_the_dtype_asked_for() -> None:
    s = sampler()
    cpu = torch.zeros(2, 3)
    meta = torch.zeros(2, 3, device="meta")
    assert s._rows("padded", 4, 16, cpu).device.type == "cpu"
    assert s._rows("padded", 4, 16, meta).device.type == "meta"
    assert s._rows("padded", 4, 16, cpu.double()).dtype == torch.float64
    assert s._buffer("noisy", cpu, 4).device.type == "cpu"
    assert s._buffer("noisy", meta, 4).device.type == "meta"
    assert s._buffer("noisy", cpu, 4, torch.long).dtype == torch.long
    assert tuple(s._buffer("noisy", torch.zeros(3, 3), 4).shape) == (4, 3, 3)  # same rows, other sample shape
    assert tuple(s._buffer("noisy", torch.zeros(5, 3), 4).shape) == (4, 5, 3)


def test_packed_sampling_refuses_inputs_of_different_shapes() -> None:
    s = sampler()
    requests = [SampleRequest(torch.rand(1, 3, 3), (2, 5)), SampleRequest(torch.rand(1, 4, 4), (2, 5))]
    with pytest.raises(SmoothAdvError, match="same shape and device"):
        PackedSampler(s).counts(requests, 8)


def test_check_image_guards_the_domain_and_only_the_domain() -> None:
    inside = torch.full((1, 2, 2), 0.5)
    check_image(inside)
    for value in (1.5, -0.5):
        low_or_high = inside.clone()
        low_or_high[0, 0, 0] = value  # one pixel out of [0, 1], the others in it
        with pytest.raises(SmoothAdvError, match=r"\[0, 1\]"):
            check_image(low_or_high)
    check_image(torch.full((1, 2, 2), -0.9), domain=(-1.0, 1.0))
    with pytest.raises(SmoothAdvError):
        check_image(torch.full((1, 2, 2), -1.5), domain=(-1.0, 1.0))
    with pytest.raises(SmoothAdvError):
        check_image(torch.full((1, 2, 2), 1.5), domain=(-1.0, 1.0))
    check_image(torch.full((7,), 5.0), domain=None)  # no box: any finite tensor of any shape


@pytest.mark.parametrize("n", ["10", None, 2.5, 0, float("inf")])
def test_sample_counts_must_be_positive_integers(n) -> None:
    with pytest.raises(SmoothAdvError, match="positive integer"):
        check_sample_args(n, 0.001, 10)
    with pytest.raises(SmoothAdvError, match="positive integer"):
        check_sample_args(10, 0.001, n)
    check_sample_args(10.0, 0.001, 4)  # an integral float is a count


def test_padded_rows_follow_the_rows_and_the_dtype_asked_for() -> None:
    """An input of 9 values is drawn as rows padded to 16 in a reused (rows, 16) buffer: one sampler serving
    pieces of 3, 10, 10 (float64), 16 and 5 (float64) rows gives exactly the noise a fresh sampler gives each
    piece (a kept buffer with too few rows, or of the other dtype, is never served)."""
    shared = sampler()
    for rows, dtype in [(3, torch.float32), (10, torch.float32), (10, torch.float64), (16, torch.float32),
                        (5, torch.float64)]:
        x = torch.zeros((1, 3, 3), dtype=dtype)
        got = served(NoiseStream(shared, x, torch.Generator().manual_seed(4)), [rows], x)
        expected = served(NoiseStream(sampler(), x, torch.Generator().manual_seed(4)), [rows], x)
        assert got.dtype == dtype and torch.equal(got, expected), (rows, dtype)
        assert got.std() > 0.3  # noise at sigma 0.5, not zeros
