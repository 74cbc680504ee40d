"""The smoothed classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I).

`Smooth` implements Cohen et al.'s PREDICT and CERTIFY with their public API
(`Smooth(base_classifier, num_classes, sigma)`, `predict(x, n, alpha, batch_size)`,
`certify(x, n0, n, alpha, batch_size)`), and `SoftSmoothed` is the smoothed *soft* classifier
G(x) = E[softmax(f(x + delta))] of Salman et al. as an ordinary differentiable module, so any
attack that maximizes cross-entropy attacks G without knowing about smoothing.

Sampling: `NoisySampler` is Cohen's `_sample_noise` (batches of noise, argmax votes counted);
`PackedSampler` is a speed strategy beside it that packs several inputs' samples into shared
forward batches and returns the same counts. `Certificate` is what CERTIFY returns, fixed-n here
and sequential in `smoothadv.sequential` (a subclass).

Papers: Cohen, Rosenfeld & Kolter, ICML 2019 (arXiv:1902.02918), Algorithms PREDICT and CERTIFY;
Salman et al., NeurIPS 2019 (arXiv:1906.04584), Section 3.

Noise is added in the model's input space, which is [0, 1] pixels because every model of this
library starts with its normalization layer; the noisy image is not clamped (as in Cohen's code).
Your own model may take other inputs: `Smooth(..., domain=(lo, hi))` or `domain=None` (any tensor)
says where they live, and sigma and the radii are then in their units.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

import torch
from torch import Tensor, nn

from .errors import SmoothAdvError
from .noise import noisy_rows
from .stats import ABSTAIN, binom_pvalue, certified_radius, clopper_pearson_lower

__all__ = [
    "Certificate", "Domain", "NoisySampler", "PIXELS", "PackedSampler", "SampleRequest", "Smooth", "SoftSmoothed",
    "check_domain", "check_image", "check_sample_args", "eval_mode", "noise_pieces",
]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of `model` in eval mode and restore each one's previous mode on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, was_training in modes:
            module.training = was_training


PIXELS: tuple[float, float] = (0.0, 1.0)
"""The default input domain: images with values in [0, 1], in whose units sigma, eps and radii are read."""

Domain: TypeAlias = tuple[float, float] | None
"""Where inputs live: a `(lo, hi)` value range of (C, H, W) images, or None for any finite tensor of any shape."""


def check_domain(domain: object) -> Domain:
    """The domain as `(lo, hi)` floats with lo < hi (infinite bounds allowed), or None; else SmoothAdvError."""
    if domain is None:
        return None
    if isinstance(domain, (str, bytes)) or not isinstance(domain, Sequence) or len(domain) != 2 or \
            not all(isinstance(v, numbers.Real) for v in domain):
        raise SmoothAdvError(f"domain must be a pair (lo, hi) of numbers or None, got {domain!r}")
    lo, hi = float(domain[0]), float(domain[1])
    if not lo < hi:  # also refuses NaN
        raise SmoothAdvError(f"domain must be (lo, hi) with lo < hi, got {domain!r}")
    return lo, hi


def _range(lo: float, hi: float) -> str:
    return f"[{lo:g}, {hi:g}]"


def check_image(x: Tensor, name: str = "x", domain: Domain = PIXELS) -> None:
    """Raise SmoothAdvError unless x is one input of the domain.

    With the default domain (0, 1), or any `(lo, hi)`: one finite floating-point image (C, H, W) with
    values in [lo, hi]. With `domain=None`: any non-empty finite floating-point tensor, of any shape.
    """
    if not isinstance(x, Tensor):
        raise SmoothAdvError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    what = "tensor" if domain is None else f"image in {_range(*domain)}"
    if not x.is_floating_point():
        raise SmoothAdvError(f"{name} must be a floating-point {what}, got dtype {x.dtype}")
    if domain is not None and x.dim() != 3:
        raise SmoothAdvError(f"{name} must be one image of shape (C, H, W), got shape {tuple(x.shape)} (for inputs "
                             "of another shape, pass domain=None to Smooth)")
    if x.numel() == 0:
        raise SmoothAdvError(f"{name} is an empty {what} of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise SmoothAdvError(f"{name} contains NaN or Inf values")
    if domain is None:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < domain[0] or hi > domain[1]:
        raise SmoothAdvError(
            f"{name} must have values in {_range(*domain)}, got range [{lo:.4g}, {hi:.4g}]; if your inputs live "
            "elsewhere, say so with Smooth(..., domain=(lo, hi)), or domain=None for any tensor (sigma and radii are "
            "then in the units of your inputs)"
        )


def check_generator(generator: object, x: Tensor, name: str = "generator") -> None:
    """Raise SmoothAdvError unless `generator` is None or a torch.Generator on x's device type (see `seeds`)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        hint = " (for an integer seed, pass torch.Generator(device=x.device).manual_seed(seed))" \
            if isinstance(generator, int) else ""
        raise SmoothAdvError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}{hint}")
    if generator.device.type != x.device.type:
        raise SmoothAdvError(f"{name} is on {generator.device} but the input on {x.device}: make it where the input "
                             "is, torch.Generator(device=x.device).manual_seed(seed)")


def check_sample_args(n: int, alpha: float, batch_size: int, name: str = "n") -> None:
    """Raise SmoothAdvError on a non-positive sample count or batch size, or alpha outside (0, 1)."""
    def count(value: object) -> bool:
        if not isinstance(value, numbers.Real):
            return False
        number = float(value)
        return math.isfinite(number) and number.is_integer() and number >= 1

    if not count(n):
        raise SmoothAdvError(f"{name} must be a positive integer, got {n}")
    if not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
        raise SmoothAdvError(f"alpha must be in (0, 1), got {alpha}")
    if not count(batch_size):
        raise SmoothAdvError(f"batch_size must be a positive integer, got {batch_size}")


# ------------------------------------------------------------------ sampling: Cohen's _sample_noise


#: torch's CPU Gaussian sampler transforms its uniforms in blocks of this many values (Box-Muller on 8 pairs) and
#: redraws the last block of a tensor whose size is not a multiple of it, so what a draw yields depends on its size
NORMAL_BLOCK = 16
#: values per draw of the canonical chunks a non-CPU device's noise is drawn in (whose streams depend on draw sizes)
CHUNK_VALUES = 1 << 20


class NoiseStream:
    """One input's stream of Gaussian noise, x + N(0, sigma^2 I), whose values depend only on the generator and
    the input's shape, never on the sizes of the pieces it is served in (so never on the batch size).

    CPU: each sample's noise is drawn as a row padded to a multiple of `NORMAL_BLOCK` values, the padding
    dropped. Torch's CPU sampler fills a tensor block by block when its size is a multiple of the block (a
    size otherwise redraws the last block), so a piece of k padded rows is the same values as k draws of one
    row: the stream is the concatenation of per-sample draws. When the per-sample size is itself a multiple
    of the block there is no padding and a piece is drawn straight into the batch: the stream every earlier
    version drew (the recorded golden outputs are unchanged). Other devices (whose samplers' values depend on
    the size of each draw): the stream is drawn in canonical chunks of a fixed number of samples (about
    `CHUNK_VALUES` values, from the shape alone) and served piece by piece; what a chunk holds beyond the last
    piece is dropped.
    """

    def __init__(self, sampler: NoisySampler, x: Tensor, generator: torch.Generator | None) -> None:
        self.sampler, self.x, self.generator = sampler, x, generator
        self.size = x.numel()
        self.width = -(-self.size // NORMAL_BLOCK) * NORMAL_BLOCK
        self.cpu = x.device.type == "cpu"
        self.chunk = max(1, CHUNK_VALUES // self.width)
        self.left: Tensor | None = None  # drawn and not yet served (non-CPU devices)

    def fill(self, out: Tensor) -> Tensor:
        """Write the stream's next len(out) noisy samples x + delta into `out` (rows of x's shape); returns it."""
        rows, sigma = len(out), self.sampler.sigma
        if self.cpu and self.width == self.size:
            return out.normal_(0.0, sigma, generator=self.generator).add_(self.x)
        flat = out.view(rows, self.size)
        if self.cpu:
            padded = self.sampler._rows("padded", rows, self.width, out)
            flat.copy_(padded.normal_(0.0, sigma, generator=self.generator)[:, :self.size])
            return out.add_(self.x)
        done = 0
        while done < rows:
            if self.left is None or len(self.left) == 0:
                drawn = torch.empty((self.chunk, self.size), device=out.device, dtype=out.dtype)
                self.left = drawn.normal_(0.0, sigma, generator=self.generator)
            take = min(rows - done, len(self.left))
            flat[done:done + take].copy_(self.left[:take])
            self.left = self.left[take:]
            done += take
        return out.add_(self.x)


def noise_pieces(segments: Sequence[int], batch_size: int) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """How one input's noise stream is drawn: pieces of min(batch_size, remaining) samples.

    The stream has sum(segments) samples; segment i is the i-th run of consecutive samples (e.g.
    CERTIFY's n0 selection samples, then its n estimation samples). Yields, for each piece in
    order, `(size, runs)` where `runs` lists the `(segment, length)` parts of the piece (lengths
    > 0, summing to `size`). The pieces depend only on `segments` and `batch_size`, never on other
    inputs: this is what makes an input's noise, and so its counts, the same whichever sampler
    draws it.
    """
    ends = list(itertools.accumulate(int(num) for num in segments))
    starts = [0, *ends[:-1]]
    total = ends[-1] if ends else 0
    for begin in range(0, total, int(batch_size)):
        end = min(begin + int(batch_size), total)
        runs = []
        for segment, (first, last) in enumerate(zip(starts, ends)):
            length = min(last, end) - max(first, begin)
            if length > 0:
                runs.append((segment, length))
        yield end - begin, runs


class NoisySampler:
    """Votes of the base classifier f on noisy copies x + delta, delta ~ N(0, sigma^2 I), of one input.

    This is Cohen et al.'s `_sample_noise` (arXiv:1902.02918, code of Algorithms PREDICT and
    CERTIFY): draw the noise in batches of at most `batch_size`, classify, count the argmax votes.

    Guarantee: the counts are those of f on i.i.d. draws of x + N(0, sigma^2 I), so they are
    Multinomial(num, (P(f(x + delta) = c))_c); the noise is drawn and added in at least float32
    whatever x's dtype, so a low-precision input does not quantize the Gaussian. NaN logits are an
    error, not votes.

    Speed: noise is drawn on x's device into one reused buffer of min(`batch_size`, samples drawn) rows, votes
    are counted on the device (one `bincount` per batch and segment), and the host sees nothing
    until the caller copies the counts. The base model runs in eval mode under
    `torch.inference_mode()`; its previous mode is restored afterwards.
    """

    def __init__(self, base: nn.Module, num_classes: int, sigma: float) -> None:
        self.base = base
        self.num_classes = num_classes
        self.sigma = sigma
        self._buffers: dict[str, Tensor] = {}

    def counts(self, x: Tensor, num: int, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """The int64 vote counts (num_classes,) of f(x + delta) over `num` noise draws, on x's device."""
        return self.segment_counts(x, (num,), batch_size, generator)[0]

    def segment_counts(self, x: Tensor, segments: Sequence[int], batch_size: int,
                       generator: torch.Generator | None = None) -> Tensor:
        """Vote counts (len(segments), num_classes) of consecutive segments of one noise stream of x.

        One stream of sum(segments) draws from `generator`, in the pieces of `noise_pieces`; row i
        counts the votes of the i-th segment. CERTIFY uses segments (n0, n): selection and
        estimation samples are disjoint, hence independent, draws.
        """
        # a batch larger than the stream draws it in one piece either way: size the buffer by what is drawn
        batch_size = min(int(batch_size), max(1, sum(int(num) for num in segments)))
        votes = torch.zeros(len(segments), self.num_classes, dtype=torch.long, device=x.device)
        nan_rows = torch.zeros((), dtype=torch.long, device=x.device)
        noisy = self._noise_buffer(x, batch_size)
        with eval_mode(self.base), torch.inference_mode():
            stream = NoiseStream(self, x, generator)
            for size, runs in noise_pieces(segments, batch_size):
                batch = stream.fill(noisy[:size])
                predictions = self._predict(batch, nan_rows)
                start = 0
                for segment, length in runs:
                    votes[segment] += torch.bincount(predictions[start:start + length], minlength=self.num_classes)
                    start += length
        _raise_on_nan(nan_rows)
        return votes

    def _predict(self, batch: Tensor, nan_rows: Tensor) -> Tensor:
        """f's argmax on a batch of noisy inputs (on the device); adds the number of NaN logit rows to `nan_rows`."""
        try:
            logits = self.base(batch)
        except RuntimeError as exc:  # shape or channel mismatch with the model, or out of memory
            if _out_of_memory(exc):
                raise SmoothAdvError(_memory_message(len(batch), batch[0], exc)) from None
            raise SmoothAdvError(
                f"the base classifier rejected an input of shape {tuple(batch.shape[1:])}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise SmoothAdvError(
                f"the base classifier returned shape {tuple(logits.shape)}, expected (batch, {self.num_classes})"
            )
        if logits.is_floating_point():
            nan_rows.add_(torch.isnan(logits).any(dim=1).sum())
        return logits.argmax(dim=1)

    def _noise_buffer(self, like: Tensor, batch: int, name: str = "noisy") -> Tensor:
        # noise is drawn and added in at least float32, whatever the input's dtype: a float16 input must not
        # quantize the Gaussian (the certificate is for f at x + N(0, sigma^2 I), Cohen et al. Theorem 1)
        return self._buffer(name, like, batch, torch.promote_types(like.dtype, torch.float32))

    def _rows(self, name: str, rows: int, width: int, like: Tensor) -> Tensor:
        """A reused (rows, width) buffer of `like`'s device and dtype (the padded rows of `NoiseStream`)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1] != width or buf.shape[0] < rows or buf.device != like.device \
                or buf.dtype != like.dtype:
            try:
                buf = torch.empty((rows, width), device=like.device, dtype=like.dtype)
            except RuntimeError as exc:  # includes torch.OutOfMemoryError
                raise SmoothAdvError(_memory_message(rows, like[0], exc)) from None
            self._buffers[name] = buf
        return buf[:rows]

    def _buffer(self, name: str, like: Tensor, batch: int, dtype: torch.dtype | None = None,
                per_sample: bool = True) -> Tensor:
        """A reused buffer of `batch` rows (each of x's shape, or scalars), on x's device."""
        shape = (batch, *like.shape) if per_sample else (batch,)
        dtype = dtype or like.dtype
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < batch or buf.device != like.device \
                or buf.dtype != dtype:
            try:
                buf = torch.empty(shape, device=like.device, dtype=dtype)
            except RuntimeError as exc:  # includes torch.OutOfMemoryError
                raise SmoothAdvError(_memory_message(batch, like, exc)) from None
            self._buffers[name] = buf
        return buf[:batch]


def _out_of_memory(exc: BaseException) -> bool:
    """Whether a RuntimeError from torch is an allocation failure (CPU or GPU)."""
    text = str(exc).lower()
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: torch >= 2.5
    return isinstance(exc, oom) or "out of memory" in text or "can't allocate memory" in text


def _memory_message(batch: int, like: Tensor, exc: BaseException) -> str:
    """One line for an allocation failure of `batch` noisy samples shaped like `like`."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (f"not enough memory for a batch of {batch} noisy samples of shape {tuple(like.shape)} on "
            f"{like.device} ({detail[:120]}); use a smaller --batch (batch_size)")


def _raise_on_nan(nan_rows: Tensor) -> None:
    if int(nan_rows):  # argmax would silently count NaN rows as votes for an arbitrary class
        raise SmoothAdvError(
            f"the base classifier returned NaN logits on {int(nan_rows)} noisy inputs; votes would be "
            "meaningless (an overflow: low precision, or a huge sigma?)"
        )


# ------------------------------------------------------------------ sampling strategy: several inputs per batch


class SampleRequest(NamedTuple):
    """Noisy samples wanted for one input: `segments` counts drawn one after another from `generator`.

    Each segment gets its own vote counts (e.g. Cohen's n0 selection samples and n estimation
    samples), but the segments share one noise stream, drawn in the pieces of `noise_pieces`.
    """

    x: Tensor
    segments: tuple[int, ...]
    generator: torch.Generator | None = None


class PackedSampler:
    """Counts for several inputs at once, their samples packed into shared, full forward batches.

    A speed strategy beside `NoisySampler` (whose model, noise level and buffers it uses): when
    one input's samples do not fill a batch, the next inputs' samples fill it, so every forward
    pass but the last of a call has `batch_size` samples, and the host sees the counts once per
    call. Several small requests (e.g. CERTIFY with small n, or the looks of sequential
    certification) then cost about as many forward passes as one large one.

    Guarantee: each request's noisy samples are bit for bit those of `sampler.segment_counts(x,
    segments, batch_size, generator)`, whatever other requests share the batches: its noise is
    drawn from its own generator in the same pieces (`noise_pieces`); only the forward batches are
    shared. So the rows of `counts(requests, batch_size)` are that call's counts, exactly when the
    model's output for a sample does not depend on the other samples of its batch (eval mode; a
    batched kernel may round differently at another batch size, which can flip a vote at a tie).
    A single request is counted by the plain loop itself: its batches are its pieces either way.

    Speed: a piece is drawn straight into the batch buffer when it fits, otherwise into a staging
    buffer and copied into this batch and the next; each sample's vote counter is recorded in a
    reused index buffer, and each batch is counted on the device with one `bincount`.
    """

    def __init__(self, sampler: NoisySampler) -> None:
        self.sampler = sampler

    def counts(self, requests: Sequence[SampleRequest], batch_size: int) -> Tensor:
        """Vote counts of every segment of every request, as one int64 tensor (total segments, num_classes).

        Rows are in request order, and within a request in segment order. The tensor is on the
        inputs' device; copying it to the host is the caller's one synchronisation. Inputs must
        share one shape and device.
        """
        if not requests:
            raise SmoothAdvError("no inputs to sample")
        first = requests[0].x
        for request in requests:
            if request.x.shape != first.shape or request.x.device != first.device:
                raise SmoothAdvError("all inputs sampled together must have the same shape and device")
        if len(requests) == 1:  # nothing to pack with: the plain loop makes the same batches
            return self.sampler.segment_counts(first, requests[0].segments, batch_size, requests[0].generator)
        # the counter (row of the result) of segment i of request r is offsets[r] + i
        offsets = list(itertools.accumulate((len(request.segments) for request in requests), initial=0))
        # a batch larger than all the samples makes one forward pass either way (and each request one piece):
        # the buffers are sized by what is drawn, so an absurd --batch costs no memory
        total = sum(int(num) for request in requests for num in request.segments)
        batch = _PackedBatch(self.sampler, first, min(int(batch_size), max(1, total)), offsets[-1])
        with eval_mode(self.sampler.base), torch.inference_mode():
            for request, offset in zip(requests, offsets):
                stream = NoiseStream(self.sampler, request.x, request.generator)
                for size, runs in noise_pieces(request.segments, batch.size):
                    piece = batch.free_rows(size)
                    in_place = piece is not None
                    if piece is None:
                        piece = self.sampler._noise_buffer(first, batch.size, "stage")[:size]
                    stream.fill(piece)
                    start = 0
                    for segment, length in runs:
                        batch.append(piece[start:start + length], offset + segment, copy=not in_place)
                        start += length
            batch.forward()
        _raise_on_nan(batch.nan_rows)
        return batch.votes.view(offsets[-1], self.sampler.num_classes)


class _PackedBatch:
    """The forward batch `PackedSampler` is filling: noisy samples, and for each the counter it votes for."""

    def __init__(self, sampler: NoisySampler, like: Tensor, size: int, counters: int) -> None:
        self.sampler = sampler
        self.size = size
        self.classes = sampler.num_classes
        self.noisy = sampler._noise_buffer(like, size)
        # flat index, in `votes`, of the first class of each sample's counter: + the predicted class = its vote
        self.owner = sampler._buffer("owner", like, size, torch.long, per_sample=False)
        self.fill = 0  # samples now in the batch
        self.votes = torch.zeros(counters * self.classes, dtype=torch.long, device=like.device)
        self.nan_rows = torch.zeros((), dtype=torch.long, device=like.device)

    def free_rows(self, count: int) -> Tensor | None:
        """The next `count` free rows of the batch (to draw a piece in place), or None if they do not fit."""
        return self.noisy[self.fill:self.fill + count] if self.fill + count <= self.size else None

    def append(self, samples: Tensor, counter: int, *, copy: bool) -> None:
        """Add noisy samples voting for `counter`, copied in unless they were drawn in place in `free_rows`;
        run the model on the batch whenever it is full."""
        done = 0
        while done < len(samples):
            take = min(len(samples) - done, self.size - self.fill)
            if copy:
                self.noisy[self.fill:self.fill + take].copy_(samples[done:done + take])
            self.owner[self.fill:self.fill + take].fill_(counter * self.classes)
            self.fill += take
            done += take
            if self.fill == self.size:
                self.forward()

    def forward(self) -> None:
        """Classify the samples in the batch and count each one's vote into its counter."""
        if self.fill == 0:
            return
        predictions = self.sampler._predict(self.noisy[:self.fill], self.nan_rows)
        self.votes.add_(torch.bincount(self.owner[:self.fill] + predictions, minlength=len(self.votes)))
        self.fill = 0


# ------------------------------------------------------------------ CERTIFY's result


@dataclass(frozen=True)
class Certificate:
    """Result of CERTIFY (Cohen et al. 2019, Algorithm CERTIFY), fixed-n or sequential.

    Unpacks as Cohen's pair, `prediction, radius = smooth.certify(...)`, and indexes like it
    (`cert[0]`, `cert[1]`, `len(cert) == 2`); the other fields are detail. Sequential
    certification returns the subclass `smoothadv.sequential.SequentialCertificate`.

    Guarantee: with probability at least 1 - alpha over the noise, the result abstains or
    g(x) = prediction and g is constant on the L2 ball of radius `radius` around x (Theorem 1).

    Attributes:
        prediction: the certified class, or ABSTAIN (-1).
        radius: the certified L2 radius sigma * Phi^-1(p_lower), in the units of the inputs ([0, 1] pixels
            unless `Smooth`'s `domain` says otherwise); 0.0 when abstaining.
        tested_class: the class whose vote probability p_A = P(f(x + delta) = tested_class) was bounded:
            the argmax of the n0 selection votes (Cohen's c_hat), or the given label (sequential label
            mode). `prediction` is this class unless the result abstains.
        p_lower: the lower confidence bound on p_A (one-sided Clopper-Pearson at level alpha; sequential:
            the largest bound over the looks made, each at its own level).
        count: votes for `tested_class` among the `n` estimation samples.
        n0: selection samples drawn to choose the class (0 when the class was given).
        n: estimation samples drawn, those `count` and `p_lower` come from. `samples` = n0 + n is the
            number of noisy forward passes used.
    """

    prediction: int
    radius: float
    tested_class: int
    p_lower: float
    count: int
    n0: int
    n: int

    def __iter__(self) -> Iterator[int | float]:
        return iter((self.prediction, self.radius))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int | float:
        return (self.prediction, self.radius)[index]

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    @property
    def samples(self) -> int:
        """Noisy forward passes used: n0 selection plus n estimation samples."""
        return self.n0 + self.n


def _checked_sigma(sigma: float) -> float:
    if not sigma > 0 or not math.isfinite(sigma):
        raise SmoothAdvError(f"sigma must be a finite number > 0, got {sigma}")
    return float(sigma)


class Smooth:
    """A smoothed classifier g built from a base classifier f and Gaussian noise of std `sigma`.

    Args:
        base_classifier: maps a batch (B, *input shape) of inputs, by default (B, C, H, W) images in
            [0, 1], to logits (B, num_classes).
        num_classes: number of classes.
        sigma: noise standard deviation, in the units of the inputs ([0, 1] pixels by default).
        domain: where the inputs live, checked on every call: `(0.0, 1.0)` (the default) takes one image
            (C, H, W) with values in [0, 1]; `(lo, hi)` one image with values in [lo, hi] (e.g. (-1, 1) or
            (0, 255)); None any finite floating-point tensor of any shape (features, sequences, ...; the
            model then gets batches (B, *x.shape)). The noise is added where the input lives, so sigma
            and the certified radii are in the units of that domain: a radius of 0.5 for (0, 255) images is
            half a grey level, not half the range. Cohen's `Smooth` checks nothing; this one checks the
            default because its units are the ones papers report.

    Randomness: each call takes `generator=` (one `torch.Generator` on x's device, or None for torch's
    global generator); `certify_many` takes `generators=`, one per input. The convention of the whole
    package, devices included, is in `smoothadv.seeds`.

    Attributes:
        sampler: the `NoisySampler` that draws the noise and counts f's votes. `base_classifier`,
            `num_classes` and `sigma` are read from it, and assigning `sigma` or `base_classifier`
            writes to it (sigma is checked), so the noise and the radius always use one sigma.

    Paper: Cohen, Rosenfeld & Kolter, ICML 2019, https://arxiv.org/abs/1902.02918.
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, *,
                 domain: Domain = PIXELS) -> None:
        sigma = _checked_sigma(sigma)
        if int(num_classes) != num_classes or num_classes < 2:
            raise SmoothAdvError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not callable(base_classifier):
            raise SmoothAdvError(f"base_classifier must be a module (or a callable) returning logits, got "
                                 f"{type(base_classifier).__name__}")
        self._domain = check_domain(domain)
        self.sampler = NoisySampler(base_classifier, int(num_classes), sigma)

    @property
    def domain(self) -> Domain:
        """Where inputs live: `(lo, hi)` for (C, H, W) images with values in [lo, hi], or None for any tensor."""
        return self._domain

    @domain.setter
    def domain(self, domain: Domain) -> None:
        self._domain = check_domain(domain)

    def check_input(self, x: Tensor, name: str = "x") -> None:
        """Raise SmoothAdvError unless x is one input of this classifier's `domain` (see `check_image`)."""
        check_image(x, name, self.domain)

    @property
    def base_classifier(self) -> nn.Module:
        return self.sampler.base

    @base_classifier.setter
    def base_classifier(self, model: nn.Module) -> None:
        self.sampler.base = model

    @property
    def num_classes(self) -> int:
        return self.sampler.num_classes

    @property
    def sigma(self) -> float:
        return self.sampler.sigma

    @sigma.setter
    def sigma(self, sigma: float) -> None:
        self.sampler.sigma = _checked_sigma(sigma)

    def sample_counts(self, x: Tensor, num: int, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Vote counts (num_classes,) of the base classifier on `num` noisy copies of x (on x's device)."""
        self.check_input(x)
        check_sample_args(num, 0.5, batch_size, "num")
        check_generator(generator, x)
        return self.sampler.counts(x, num, batch_size, generator)

    def predict(self, x: Tensor, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> int:
        """Cohen et al.'s PREDICT: the smoothed prediction g(x), or ABSTAIN.

        Guarantee: with probability at least 1 - alpha over the noise, the returned class is g(x)
        or the result is ABSTAIN (two-sided binomial test on the top two counts, Hung & Fithian).
        """
        self.check_input(x)
        check_sample_args(n, alpha, batch_size)
        check_generator(generator, x)
        counts = self.sampler.counts(x, n, batch_size, generator).cpu()
        top2 = torch.topk(counts, 2)
        count_a, count_b = int(top2.values[0]), int(top2.values[1])
        if binom_pvalue(count_a, count_a + count_b, 0.5) > alpha:
            return ABSTAIN
        return int(top2.indices[0])

    def certify(self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> Certificate:
        """Cohen et al.'s CERTIFY: the prediction of g at x and a certified L2 radius around x.

        The class is chosen from `n0` selection samples; p_A is then bounded below with the
        one-sided (1 - alpha) Clopper-Pearson bound from `n` fresh estimation samples; the result
        abstains if that bound is below 1/2, and otherwise has radius sigma * Phi^-1(p_lower).
        The n0 + n samples are one noise stream from `generator` (n0 first).

        Guarantee: with probability at least 1 - alpha over the noise, the result is ABSTAIN or
        g(x) = prediction and g is constant on the L2 ball of that radius around x.
        Unpacks as `(prediction, radius)`; see `Certificate` for the extra detail.
        """
        check_sample_args(n0, alpha, batch_size, "n0")
        check_sample_args(n, alpha, batch_size)
        self.check_input(x)
        check_generator(generator, x)
        selection, estimation = self.sampler.segment_counts(x, (int(n0), int(n)), batch_size, generator).cpu()
        return self._certificate(selection, estimation, n0, n, alpha)

    def certify_many(self, xs: Sequence[Tensor] | Tensor, n0: int, n: int, alpha: float, batch_size: int,
                     generators: Sequence[torch.Generator | None] | None = None) -> list[Certificate]:
        """CERTIFY for several inputs at once, their samples packed into shared forward passes (`PackedSampler`).

        `xs` is a sequence of images (C, H, W) or one batch tensor (B, C, H, W), taken as its B
        images; any other tensor is a SmoothAdvError. Each input's n0 selection and n estimation
        samples are one noise stream drawn from its own generator (n0 first), so
        `certify_many(xs, ..., gens)[i]` equals `certify(xs[i], ..., gens[i])` whatever other
        inputs are packed with it. The guarantee of `certify` holds for each input separately.
        Inputs must share one shape and device.
        """
        check_sample_args(n0, alpha, batch_size, "n0")
        check_sample_args(n, alpha, batch_size)
        if isinstance(xs, Tensor):
            if xs.dim() != 4 if self.domain is not None else xs.dim() < 1:
                raise SmoothAdvError(f"xs must be a sequence of images (C, H, W) or one batch (B, C, H, W), got a "
                                     f"tensor of shape {tuple(xs.shape)}")
            xs = list(xs.unbind(0))
        if isinstance(generators, torch.Generator):
            raise SmoothAdvError(f"generators takes one torch.Generator per input, a list of {len(xs)}, got one "
                                 "Generator; e.g. [seeds.example_generator(seed, i, x.device) for i in range(len(xs))]")
        generators = list(generators) if generators is not None else [None] * len(xs)
        if len(generators) != len(xs):
            raise SmoothAdvError(f"got {len(xs)} inputs but {len(generators)} generators")
        for i, (x, generator) in enumerate(zip(xs, generators)):
            self.check_input(x)
            check_generator(generator, x, f"generators[{i}]")
        if not xs:
            return []
        requests = [SampleRequest(x, (int(n0), int(n)), g) for x, g in zip(xs, generators)]
        counts = PackedSampler(self.sampler).counts(requests, batch_size).view(len(xs), 2, self.num_classes).cpu()
        return [self._certificate(selection, estimation, n0, n, alpha) for selection, estimation in counts]

    def _certificate(self, selection: Tensor, estimation: Tensor, n0: int, n: int, alpha: float) -> Certificate:
        """CERTIFY's decision from the selection and estimation vote counts (Cohen et al., Algorithm CERTIFY)."""
        c_hat = int(selection.argmax())
        count = int(estimation[c_hat])
        p_lower = clopper_pearson_lower(count, n, alpha)
        if p_lower < 0.5:
            prediction, radius = ABSTAIN, 0.0
        else:
            prediction, radius = c_hat, certified_radius(p_lower, self.sigma)
        return Certificate(prediction=prediction, radius=float(radius), tested_class=c_hat, p_lower=float(p_lower),
                           count=count, n0=int(n0), n=int(n))


class SoftSmoothed(nn.Module):
    """The smoothed soft classifier x -> log((1/m) sum_i softmax(f(x + delta_i))) with fixed draws.

    The noise `(B, m, C, H, W)` is drawn once by the caller and kept for every call, as in
    SmoothAdv's attack (Salman et al. 2019, Section 3). The output is a (B, K) tensor of
    log-probabilities of the Monte-Carlo estimate of G, so cross-entropy on it is -log G_y(x):
    an attack that maximizes cross-entropy of its model attacks the smoothed classifier.

    It also implements `attacks.GradientFreeModel` (`ascent_direction`), so the gradient-free
    `attacks.SteinPGDL2` can attack it without backpropagating through f.
    """

    def __init__(self, base: nn.Module, noise: Tensor) -> None:
        super().__init__()
        if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.dim() < 2 or noise.numel() == 0:
            got = f"shape {tuple(noise.shape)}" if isinstance(noise, Tensor) else type(noise).__name__
            raise SmoothAdvError(
                f"SoftSmoothed's noise must be a floating-point tensor (B, m, C, H, W): m draws per input of a batch "
                f"(B, C, H, W) (any input shape: (B, m, *x.shape[1:])), e.g. torch.randn(B, m, C, H, W) * sigma "
                f"(noise.noise_copies(x, m, sigma)); got {got}")
        self.base = base
        self.noise = noise

    def _noisy(self, x: Tensor) -> Tensor:
        """The B*m noisy copies x_b + delta_{b,i}, (B*m, C, H, W), after checking x against the noise."""
        if not isinstance(x, Tensor) or x.shape[:1] != self.noise.shape[:1] or x.shape[1:] != self.noise.shape[2:]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            batch, m, *rest = self.noise.shape
            raise SmoothAdvError(
                f"SoftSmoothed's input must be a batch {(batch, *rest)} matching its noise (B, m, C, H, W) = "
                f"{tuple(self.noise.shape)}, got {got}; draw noise for this batch (m copies per input)")
        return noisy_rows(x, self.noise)

    def forward(self, x: Tensor) -> Tensor:
        batch, m = self.noise.shape[:2]
        log_probs = torch.log_softmax(self.base(self._noisy(x)), dim=1).view(batch, m, -1)
        return torch.logsumexp(log_probs, dim=1) - math.log(m)

    def ascent_direction(self, x: Tensor, y: Tensor) -> Tensor:
        """-(1/m) sum_i F_y(x + delta_i) delta_i over the fixed draws, from forward passes of f only.

        F = softmax(f). By the Gaussian-smoothing (Stein) identity grad G_y(x) = E[delta F_y(x + delta)] /
        sigma^2 (Salman et al. 2019, Appendix), its expectation is -sigma^2 grad G_y(x) = sigma^2 G_y(x)
        grad(-log G_y)(x): a positive per-example multiple of the gradient of this module's cross-entropy
        -log G_y, i.e. its ascent direction (what `attacks.GradientFreeModel` asks for). No autograd graph.
        """
        batch, m = self.noise.shape[:2]
        with torch.no_grad():
            probs = torch.softmax(self.base(self._noisy(x)), dim=1).view(batch, m, -1)
            if tuple(y.shape) != (batch,) or int(y.min()) < 0 or int(y.max()) >= probs.shape[2]:
                raise SmoothAdvError(f"y must hold {batch} labels in [0, {probs.shape[2]}), got {y.tolist()[:8]}")
            p_y = probs.gather(2, y.view(batch, 1, 1).expand(batch, m, 1)).squeeze(2)  # (B, m)
            return -(p_y.view(batch, m, *([1] * (self.noise.dim() - 2))) * self.noise).mean(1)
