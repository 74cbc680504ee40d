"""The smoothed classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I).

`Smooth` implements Cohen et al.'s PREDICT and CERTIFY with their public API
(`Smooth(base_classifier, num_classes, sigma)`, `predict(x, n, alpha, batch_size)`,
`certify(x, n0, n, alpha, batch_size)`), and `SoftSmoothed` is the smoothed *soft* classifier
G(x) = E[softmax(f(x + delta))] of Salman et al. as an ordinary differentiable module, so any
attack that maximizes cross-entropy attacks G without knowing about smoothing.

Papers: Cohen, Rosenfeld & Kolter, ICML 2019 (arXiv:1902.02918), Algorithms PREDICT and CERTIFY;
Salman et al., NeurIPS 2019 (arXiv:1906.04584), Section 3.

Noise is added in the model's input space, which is [0, 1] pixels because every model of this
library starts with its normalization layer; the noisy image is not clamped (as in Cohen's code).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .errors import SmoothAdvError
from .stats import ABSTAIN, binom_pvalue, certified_radius, clopper_pearson_lower


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


def check_image(x: Tensor, name: str = "x") -> None:
    """Raise SmoothAdvError unless x is one finite floating-point image (C, H, W) with values in [0, 1]."""
    if not isinstance(x, Tensor):
        raise SmoothAdvError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise SmoothAdvError(f"{name} must be a floating-point image in [0, 1], got dtype {x.dtype}")
    if x.dim() != 3:
        raise SmoothAdvError(f"{name} must be one image of shape (C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise SmoothAdvError(f"{name} is an empty image of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise SmoothAdvError(f"{name} contains NaN or Inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise SmoothAdvError(f"{name} must have pixel values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


def check_sample_args(n: int, alpha: float, batch_size: int, name: str = "n") -> None:
    """Raise SmoothAdvError on a non-positive sample count or batch size, or alpha outside (0, 1)."""
    def count(value: object) -> bool:
        return isinstance(value, numbers.Real) and math.isfinite(value) and int(value) == value and value >= 1

    if not count(n):
        raise SmoothAdvError(f"{name} must be a positive integer, got {n}")
    if not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
        raise SmoothAdvError(f"alpha must be in (0, 1), got {alpha}")
    if not count(batch_size):
        raise SmoothAdvError(f"batch_size must be a positive integer, got {batch_size}")


class SampleRequest(NamedTuple):
    """Noisy samples wanted for one input: `segments` counts drawn one after another from `generator`.

    Each segment gets its own vote counts (e.g. Cohen's n0 selection samples and n estimation
    samples), but the segments share one noise stream, drawn in pieces of the batch size.
    """

    x: Tensor
    segments: tuple[int, ...]
    generator: torch.Generator | None = None


class NoisySampler:
    """Counts the base classifier's votes on noisy copies of one or several inputs.

    Speed: noise is drawn on the inputs' device into one reused buffer of `batch_size` samples,
    every forward pass is a full batch of that static size (except the last one of a call),
    several inputs' samples share a forward pass when one input does not fill it, votes are
    counted on the device with one `bincount` per batch, and the host sees the counts once per
    call. The base model runs in eval mode under `torch.inference_mode()`; its previous mode is
    restored afterwards.

    Independence from packing: an input's noise stream is drawn from its own generator in
    pieces of min(batch_size, remaining) samples aligned to the start of its request, whatever
    other inputs share the batches, so its counts do not depend on which inputs it is packed
    with (up to floating-point differences of the model's batched kernels).
    """

    def __init__(self, base: nn.Module, num_classes: int, sigma: float) -> None:
        self.base = base
        self.num_classes = num_classes
        self.sigma = sigma
        self._buffers: dict[str, Tensor] = {}

    def _buffer(self, name: str, like: Tensor, batch: int, dtype: torch.dtype | None = None,
                per_sample: bool = True) -> Tensor:
        shape = (batch, *like.shape) if per_sample else (batch,)
        dtype = dtype or like.dtype
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < batch or buf.device != like.device \
                or buf.dtype != dtype:
            buf = torch.empty(shape, device=like.device, dtype=dtype)
            self._buffers[name] = buf
        return buf[:batch]

    def counts(self, x: Tensor, num: int, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Return the int64 vote counts (num_classes,) of f(x + delta) over `num` noise draws, on x's device."""
        return self.counts_many([SampleRequest(x, (int(num),), generator)], batch_size)[0]

    def counts_many(self, requests: Sequence[SampleRequest], batch_size: int) -> Tensor:
        """Vote counts of every segment of every request, as one int64 tensor (total segments, num_classes).

        Rows are in request order, and within a request in segment order. The tensor is on the
        inputs' device; copying it to the host is the caller's one synchronisation.
        """
        if not requests:
            raise SmoothAdvError("no inputs to sample")
        first = requests[0].x
        for request in requests:
            if request.x.shape != first.shape or request.x.device != first.device:
                raise SmoothAdvError("all inputs sampled together must have the same shape and device")
        num_slots = sum(len(r.segments) for r in requests)
        classes = self.num_classes
        batch_size = int(batch_size)
        counts = torch.zeros(num_slots * classes, dtype=torch.long, device=first.device)
        nan_rows = torch.zeros((), dtype=torch.long, device=first.device)
        # noise is drawn and added in at least float32, whatever the input's dtype: a float16 input must not
        # quantize the Gaussian (the certificate is for f at x + N(0, sigma^2 I), Cohen et al. Theorem 1)
        noise_dtype = torch.promote_types(first.dtype, torch.float32)
        noisy = self._buffer("noisy", first, batch_size, noise_dtype)
        owner = self._buffer("owner", first, batch_size, torch.long, per_sample=False)
        runs: list[tuple[int, int, int]] = []  # (start, end, slot) of the samples now in `noisy`
        fill = 0

        def flush() -> None:
            nonlocal fill
            logits = self._forward(noisy[:fill], first)
            if logits.is_floating_point():
                nan_rows.add_(torch.isnan(logits).any(dim=1).sum())
            predictions = logits.argmax(dim=1)
            if len(runs) == 1:
                slot = runs[0][2]
                counts[slot * classes:(slot + 1) * classes] += torch.bincount(predictions, minlength=classes)
            else:
                for start, end, slot in runs:
                    owner[start:end].fill_(slot * classes)
                counts.add_(torch.bincount(owner[:fill] + predictions, minlength=num_slots * classes))
            runs.clear()
            fill = 0

        def place(piece: Tensor, slots: list[tuple[int, int]], in_place: bool) -> None:
            """Append a piece's samples (already noisy) at `fill`, recording which slot each belongs to."""
            nonlocal fill
            offset = 0
            for slot, length in slots:
                while length > 0:
                    take = min(length, batch_size - fill)
                    if not in_place:
                        noisy[fill:fill + take].copy_(piece[offset:offset + take])
                    runs.append((fill, fill + take, slot))
                    fill += take
                    offset += take
                    length -= take
                    if fill == batch_size:
                        flush()

        with eval_mode(self.base), torch.inference_mode():
            slot_base = 0
            for request in requests:
                segments = [(slot_base + i, int(num)) for i, num in enumerate(request.segments)]
                slot_base += len(segments)
                total = sum(num for _, num in segments)
                while total > 0:
                    size = min(batch_size, total)
                    # a piece is drawn in place when it fits in the batch buffer, else in a staging buffer
                    in_place = fill + size <= batch_size
                    piece = noisy[fill:fill + size] if in_place else self._buffer("stage", first, batch_size,
                                                                                    noise_dtype)[:size]
                    piece.normal_(0.0, self.sigma, generator=request.generator)
                    piece.add_(request.x)
                    taken: list[tuple[int, int]] = []
                    need = size
                    while need > 0:
                        slot, num = segments[0]
                        take = min(num, need)
                        taken.append((slot, take))
                        need -= take
                        if take == num:
                            segments.pop(0)
                        else:
                            segments[0] = (slot, num - take)
                    place(piece, taken, in_place)
                    total -= size
            if fill > 0:
                flush()
        if int(nan_rows):  # argmax would silently count NaN rows as votes for an arbitrary class
            raise SmoothAdvError(
                f"the base classifier returned NaN logits on {int(nan_rows)} noisy inputs; votes would be "
                "meaningless (an overflow: low precision, or a huge sigma?)"
            )
        return counts.view(num_slots, classes)

    def _forward(self, batch: Tensor, example: Tensor) -> Tensor:
        try:
            logits = self.base(batch)
        except RuntimeError as exc:  # shape or channel mismatch with the model
            raise SmoothAdvError(
                f"the base classifier rejected an input of shape {tuple(example.shape)}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise SmoothAdvError(
                f"the base classifier returned shape {tuple(logits.shape)}, expected (batch, {self.num_classes})"
            )
        return logits


class Certificate(tuple):
    """Result of CERTIFY. Unpacks as Cohen's pair: `prediction, radius = smooth.certify(...)`.

    Extra detail is available as attributes: `p_lower` (the lower confidence bound on p_A),
    `count` (votes for the predicted class among the estimation samples), `n` (estimation
    samples used) and `n0` (selection samples used).
    """

    prediction: int
    radius: float

    def __new__(cls, prediction: int, radius: float, p_lower: float, count: int, n: int, n0: int) -> Certificate:
        self = super().__new__(cls, (int(prediction), float(radius)))
        self.p_lower = float(p_lower)
        self.count = int(count)
        self.n = int(n)
        self.n0 = int(n0)
        return self

    @property
    def prediction(self) -> int:  # type: ignore[override]
        return self[0]

    @property
    def radius(self) -> float:  # type: ignore[override]
        return self[1]

    @property
    def abstained(self) -> bool:
        return self[0] == ABSTAIN

    def __repr__(self) -> str:
        return (f"Certificate(prediction={self.prediction}, radius={self.radius:.4f}, p_lower={self.p_lower:.6f}, "
                f"count={self.count}, n={self.n}, n0={self.n0})")


class Smooth:
    """A smoothed classifier g built from a base classifier f and Gaussian noise of std `sigma`.

    Args:
        base_classifier: maps a batch (B, C, H, W) of [0, 1] images to logits (B, num_classes).
        num_classes: number of classes.
        sigma: noise standard deviation, in [0, 1]-pixel units.

    Paper: Cohen, Rosenfeld & Kolter, ICML 2019, https://arxiv.org/abs/1902.02918.
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float) -> None:
        if not sigma > 0 or not math.isfinite(sigma):
            raise SmoothAdvError(f"sigma must be a finite number > 0, got {sigma}")
        if int(num_classes) != num_classes or num_classes < 2:
            raise SmoothAdvError(f"num_classes must be an integer >= 2, got {num_classes}")
        self.base_classifier = base_classifier
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self._sampler = NoisySampler(base_classifier, self.num_classes, self.sigma)

    def sample_counts(self, x: Tensor, num: int, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Vote counts (num_classes,) of the base classifier on `num` noisy copies of x (on x's device)."""
        check_image(x)
        check_sample_args(num, 0.5, batch_size, "num")
        return self._sampler.counts(x, num, batch_size, generator)

    def predict(self, x: Tensor, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> int:
        """Cohen et al.'s PREDICT: the smoothed prediction g(x), or ABSTAIN.

        Guarantee: with probability at least 1 - alpha over the noise, the returned class is g(x)
        or the result is ABSTAIN (two-sided binomial test on the top two counts, Hung & Fithian).
        """
        check_image(x)
        check_sample_args(n, alpha, batch_size)
        counts = self._sampler.counts(x, n, batch_size, generator).cpu()
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

        Guarantee: with probability at least 1 - alpha over the noise, the result is ABSTAIN or
        g(x) = prediction and g is constant on the L2 ball of that radius around x.
        Unpacks as `(prediction, radius)`; see `Certificate` for the extra detail.
        """
        return self.certify_many([x], n0, n, alpha, batch_size, [generator])[0]

    def certify_many(self, xs: Sequence[Tensor], n0: int, n: int, alpha: float, batch_size: int,
                     generators: Sequence[torch.Generator | None] | None = None) -> list[Certificate]:
        """CERTIFY for several inputs at once, their samples packed into shared forward passes.

        Each input's n0 selection and n estimation samples are one noise stream drawn from its own
        generator (n0 first), so `certify_many(xs, ..., gens)[i]` equals `certify(xs[i], ...,
        gens[i])` whatever other inputs are packed with it. The guarantee of `certify` holds for
        each input separately. Inputs must share one shape and device.
        """
        check_sample_args(n0, alpha, batch_size, "n0")
        check_sample_args(n, alpha, batch_size)
        generators = list(generators) if generators is not None else [None] * len(xs)
        if len(generators) != len(xs):
            raise SmoothAdvError(f"got {len(xs)} inputs but {len(generators)} generators")
        for x in xs:
            check_image(x)
        if not xs:
            return []
        requests = [SampleRequest(x, (int(n0), int(n)), g) for x, g in zip(xs, generators)]
        counts = self._sampler.counts_many(requests, batch_size).view(len(xs), 2, self.num_classes).cpu()
        certificates = []
        for selection, estimation in counts:
            c_hat = int(selection.argmax())
            count_a = int(estimation[c_hat])
            p_lower = clopper_pearson_lower(count_a, n, alpha)
            if p_lower < 0.5:
                certificates.append(Certificate(ABSTAIN, 0.0, p_lower, count_a, n, n0))
            else:
                certificates.append(Certificate(c_hat, certified_radius(p_lower, self.sigma), p_lower, count_a, n, n0))
        return certificates


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
        if noise.dim() < 2:
            raise ValueError("noise must have shape (B, m, *input_shape)")
        self.base = base
        self.noise = noise

    def _noisy(self, x: Tensor) -> Tensor:
        """The B*m noisy copies x_b + delta_{b,i}, (B*m, C, H, W), after checking x against the noise."""
        if x.shape[0] != self.noise.shape[0] or x.shape[1:] != self.noise.shape[2:]:
            raise ValueError(f"input shape {tuple(x.shape)} does not match noise shape {tuple(self.noise.shape)}")
        return (x.unsqueeze(1) + self.noise).flatten(0, 1)

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
            p_y = probs.gather(2, y.view(batch, 1, 1).expand(batch, m, 1)).squeeze(2)  # (B, m)
            return -(p_y.view(batch, m, *([1] * (self.noise.dim() - 2))) * self.noise).mean(1)
