"""L2 adversarial attacks that know nothing about smoothing: PGD, its gradient-free variant, and DDN.

An attack is a frozen dataclass of hyperparameters, called as `attack(model, x, y) -> x_adv` with
the model given at call time (so a training loop can keep one attack while the weights change).
To attack the smoothed soft classifier G of Salman et al. (NeurIPS 2019, arXiv:1906.04584,
Section 3), pass `smoothing.SoftSmoothed(base, noise)` as the model: it returns log G, so the
cross-entropy these attacks maximize is -log G_y, the paper's objective J (Eq. (5)/(6)), with the
m noise draws fixed across all steps because they live in the module.

The attacks see a model only through two interfaces, both declared here: `Model` (a callable
returning logits or log-probabilities, differentiated with `torch.autograd.grad`), used by `PGDL2`
and `DDN`, and `GradientFreeModel` (a model that estimates the ascent direction of its own
cross-entropy from forward passes), used by `SteinPGDL2`. Nothing here imports `smoothing` or
reads a model's attributes; `SoftSmoothed` implements both interfaces.

Contract (every attack, tested in tests/unit/test_attacks.py):
- `x` is a batch (B, ...) with finite values in [0, 1], and `y` holds B integer labels in
  [0, K) for a model of K outputs; anything else is a SmoothAdvError (one line) before any
  step. The result is a batch in [0, 1].
- ||x_adv - x||_2 <= eps for every example (natural units: eps = 0.5 means 0.5 in [0, 1] pixels).
- No side effects on the model: an `nn.Module` is attacked in eval mode (BatchNorm uses its running
  statistics and updates nothing, dropout is off), and every submodule's train/eval mode is restored
  afterwards, as torchattacks does; its parameters' `requires_grad` are left alone, and gradients are
  taken with respect to the input only (`torch.autograd.grad`), so no parameter `.grad` is touched. To
  attack a module in train mode, pass a plain function, e.g. `lambda z: net(z)`.
- Attacks are configured first and get the model at call time: `PGDL2(eps=0.5, steps=10)(model, x, y)`;
  the torchattacks habit `PGDL2(model, eps=0.5)` is refused with that advice.
- eps = 0 returns `x` unchanged without calling the model or drawing random numbers.
- Untargeted only. Randomness (random start, the rare zero-gradient fallback) comes from the
  optional `generator`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SmoothAdvError
from .settings import AT_LEAST_ONE, NONNEGATIVE, POSITIVE, PROBABILITY, convert, fields_of, recipe_key, setting

__all__ = [
    "ATTACKS", "ATTACK_NAME", "Attack", "DDN", "DDN_RULE_KEYS", "GRADIENT_FREE", "GradientFreeModel", "Model",
    "PGDL2", "SteinPGDL2", "attack_mode", "attack_recipe", "attack_settings", "build_attack", "check_batch",
    "check_labels", "get_attack", "l2_norm", "project",
]

Model = Callable[[Tensor], Tensor]
"""What PGDL2 and DDN attack: x (B, ...) -> logits or log-probabilities (B, K), differentiable in x."""


@runtime_checkable
class GradientFreeModel(Protocol):
    """A model that estimates the ascent direction of its own loss without backpropagation.

    `ascent_direction(x, y)` returns a (B, ...) tensor, computed from forward passes only, whose
    expectation is a positive per-example multiple of the gradient with respect to x of the
    cross-entropy of the model's output at (x, y). Only its per-example direction matters: the
    attack normalizes it. `smoothing.SoftSmoothed` implements it with the Gaussian-smoothing
    (Stein) identity of Salman et al. (2019), Appendix.
    """

    def ascent_direction(self, x: Tensor, y: Tensor) -> Tensor:
        ...


class Attack(Protocol):
    """What training and evaluation call: an L2 budget `eps` and `attack(model, x, y, generator)`.

    The library's attacks are frozen dataclasses with an `eps` field. An attack plugged into
    `objectives.SmoothAdv` must be a dataclass too: the eps warm-up makes each epoch's attack with
    `dataclasses.replace(attack, eps=...)` (`SmoothAdv` refuses anything else when it is built).
    """

    @property
    def eps(self) -> float:
        """The L2 budget in [0, 1]-pixel units."""
        ...

    def __call__(self, model: Model, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        ...


@contextlib.contextmanager
def attack_mode(model: object) -> Iterator[None]:
    """Eval mode for an `nn.Module` while it is attacked; afterwards every submodule's mode as it was."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _L2Attack:
    """What every attack here shares: it is called as attack(model, x, y), checks the batch, returns x unchanged at
    eps = 0 and otherwise runs its `_attack` with the model in attack mode (`attack_mode`). Making one with a model,
    the torchattacks habit, is refused with what to write instead."""

    eps: float

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if any(callable(value) and not isinstance(value, (int, float)) for value in (*args, *kwargs.values())):
            raise SmoothAdvError(f"{cls.__name__} takes the model when it is called, not when it is made: write "
                                 f"{cls.__name__}(eps=0.5, steps=10)(model, x, y)")
        return super().__new__(cls)

    def __call__(self, model: Model, x: Tensor, y: Tensor, generator: torch.Generator | None = None, *,
                 domain: Domain = (0.0, 1.0)) -> Tensor:
        """x_adv for the batch x with labels y. `domain` is where the inputs live ([0, 1] by default): x is checked
        against it and x_adv kept in it; (lo, hi) for another box, None for no box (eps in the inputs' units)."""
        self._accepts(model)
        top_label = check_batch(x, y, domain)
        if self.eps == 0:
            return x
        with attack_mode(model):
            return self._attack(model, x.detach(), y, top_label, generator, domain)

    def _accepts(self, model: Model) -> None:
        """Raise SmoothAdvError if this attack cannot use `model` (checked once, before any step)."""

    def _attack(self, model: Model, x: Tensor, y: Tensor, top_label: int, generator: torch.Generator | None,
                domain: Domain) -> Tensor:
        raise NotImplementedError


def l2_norm(t: Tensor) -> Tensor:
    """Per-example L2 norm of a batch (B, ...) -> (B,)."""
    return t.flatten(1).norm(dim=1)


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


Domain = tuple[float, float] | None
"""Where inputs live (as `smoothing.Smooth`'s `domain`): a value box (lo, hi), [0, 1] by default, or None (no box)."""


def project(x: Tensor, delta: Tensor, eps: float, domain: Domain = (0.0, 1.0)) -> Tensor:
    """Clamp x + delta to the box of `domain` ([0, 1]; no clamp for None), then scale delta into the L2 ball of
    radius eps (the order of Salman et al.'s SmoothAdv_PGD). Scaling towards x keeps x + delta in the box because
    x is in it."""
    if domain is not None:
        delta = (x + delta).clamp(domain[0], domain[1]) - x
    norms = l2_norm(delta)
    factor = torch.where(norms > eps, eps / norms.clamp_min(1e-12), torch.ones_like(norms))
    return delta * _view(factor, delta)


def check_batch(x: Tensor, y: Tensor, domain: tuple[float, float] | None = (0.0, 1.0)) -> int:
    """Raise SmoothAdvError unless x is a floating-point batch (B, ...) with finite values in `domain`
    ([0, 1] by default; `(lo, hi)` for inputs that live elsewhere, None for any finite values, as
    `smoothing.Smooth`'s `domain`) and y is B integer labels >= 0; returns the largest label (checked
    against the model's outputs at its first call, `check_labels`). One host synchronisation."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        got = str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__
        raise SmoothAdvError(f"the attack needs a non-empty floating-point batch x of shape (B, ...), got {got}")
    if isinstance(y, Tensor) and y.dim() == 0:
        raise SmoothAdvError(f"the attack needs a batch: x of shape {tuple(x.shape)} with one label looks like a "
                             "single image; pass x[None] and y[None] (or y.view(1))")
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool \
            or tuple(y.shape) != (x.shape[0],):
        shown = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise SmoothAdvError(f"the attack needs y as {x.shape[0]} integer labels (a tensor of shape ({x.shape[0]},)), "
                             f"got {shown}")
    x_lo, x_hi, y_lo, y_hi = torch.stack([x.detach().min().double(), x.detach().max().double(),
                                          y.min().double(), y.max().double()]).tolist()
    if not (math.isfinite(x_lo) and math.isfinite(x_hi)):
        raise SmoothAdvError("the attack input x contains NaN or Inf values")
    if domain is not None and (x_lo < domain[0] or x_hi > domain[1]):
        raise SmoothAdvError(f"the attack input x must have values in [{domain[0]:g}, {domain[1]:g}], got range "
                             f"[{x_lo:.4g}, {x_hi:.4g}]")
    if y_lo < 0:
        raise SmoothAdvError(f"labels must be >= 0, got {int(y_lo)}")
    return int(y_hi)


def check_labels(top_label: int, logits: Tensor) -> None:
    """Raise SmoothAdvError if a label (the largest is `top_label`) is not one of the model's K outputs."""
    if logits.dim() != 2 or top_label >= logits.shape[1]:
        raise SmoothAdvError(f"labels must be in [0, {logits.shape[-1]}) for a model of {logits.shape[-1]} outputs, "
                             f"got {top_label}" if logits.dim() == 2 else
                             f"the model must return (B, K) scores, got shape {tuple(logits.shape)}")


def _input_grad(model: Model, x_adv: Tensor, y: Tensor, top_label: int | None = None) -> tuple[Tensor, Tensor]:
    """Gradient of the summed cross-entropy with respect to the input only, and the logits
    (with `top_label`, the largest label, first checked against the model's outputs)."""
    with torch.enable_grad():
        point = x_adv.detach().requires_grad_(True)
        logits = model(point)
        if top_label is not None:
            check_labels(top_label, logits)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, point)
    return grad, logits.detach()


def _normalize(g: Tensor, generator: torch.Generator | None) -> Tensor:
    """g / ||g|| per example; a zero gradient is replaced by a random unit direction (Salman et al.'s
    code uses an un-normalized N(0, I) draw; both are then projected, we keep the step length)."""
    zero = l2_norm(g) == 0
    if bool(zero.any()):
        g = g.clone()
        g[zero] = torch.randn(g[zero].shape, device=g.device, dtype=g.dtype, generator=generator)
    return g / _view(l2_norm(g).clamp_min(1e-12), g)


def _check(eps: float, steps: int) -> None:
    if not math.isfinite(eps) or eps < 0:
        raise SmoothAdvError(f"attack eps must be a finite number >= 0, got {eps}")
    if int(steps) != steps or steps < 1:
        raise SmoothAdvError(f"attack steps must be an integer >= 1, got {steps}")


@dataclass(frozen=True)
class _ProjectedL2Ascent(_L2Attack):
    """The PGD loop shared by `PGDL2` and `SteinPGDL2`; subclasses say where the ascent direction comes from.

    T = `steps` steps of length `step_length` along the per-example normalized direction, each
    followed by a clamp to [0, 1] and a projection onto the eps-ball. Starts at x (the original
    never used a random start); `random_start` starts at a uniformly random radius in [0, eps] in a
    random direction.
    """

    eps: float = setting(help="attack L2 radius in [0, 1] pixels", limit=NONNEGATIVE)
    steps: int = setting(10, "attack steps T", limit=AT_LEAST_ONE)
    step_size: float | None = setting(None, "PGD step length (default 2 eps / T, the SmoothAdv code's)",
                                      limit=POSITIVE)
    random_start: bool = setting(False, "PGD: start at a random point of the eps-ball")

    def __post_init__(self) -> None:
        _check(self.eps, self.steps)
        if self.step_size is not None and not self.step_size > 0:
            raise SmoothAdvError(f"attack step size must be > 0, got {self.step_size}")

    @property
    def step_length(self) -> float:
        """The L2 length of each step: `step_size`, or 2 eps / steps (the SmoothAdv code's default) when None."""
        return self.step_size if self.step_size is not None else 2 * self.eps / self.steps

    def _direction(self, model: Model, x_adv: Tensor, y: Tensor, top_label: int) -> Tensor:
        raise NotImplementedError

    def _attack(self, model: Model, x: Tensor, y: Tensor, top_label: int, generator: torch.Generator | None,
                domain: Domain) -> Tensor:
        delta = torch.zeros_like(x)
        if self.random_start:
            direction = _normalize(torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator), None)
            radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype, generator=generator) * self.eps
            delta = project(x, direction * _view(radius, x), self.eps, domain)
        for _ in range(self.steps):
            step = _normalize(self._direction(model, x + delta, y, top_label), generator)
            delta = project(x, delta + self.step_length * step, self.eps, domain)
        return (x + delta).detach()


@dataclass(frozen=True)
class PGDL2(_ProjectedL2Ascent):
    """L2 projected gradient ascent on the cross-entropy (SmoothAdv_PGD, Salman et al. 2019, Section 3).

    T = `steps` steps of length `step_length` (`step_size`, default 2 eps / T as the SmoothAdv code)
    along the per-example normalized input gradient of the cross-entropy (backpropagated with
    `torch.autograd.grad`), each followed by a clamp to [0, 1] and a projection onto the eps-ball.
    Starts at x (the original never used a random start); `random_start` starts at a uniformly
    random radius in [0, eps] in a random direction. Works on any differentiable `Model`.
    """

    def _direction(self, model: Model, x_adv: Tensor, y: Tensor, top_label: int) -> Tensor:
        grad, _ = _input_grad(model, x_adv, y, top_label)
        return grad


@dataclass(frozen=True)
class SteinPGDL2(_ProjectedL2Ascent):
    """Gradient-free SmoothAdv_PGD: PGDL2's loop with the direction from `model.ascent_direction`.

    The model must implement `GradientFreeModel` (as `smoothing.SoftSmoothed` does, with the
    Gaussian-smoothing identity grad G_y(x) = E[delta F_y(x + delta)] / sigma^2 over its fixed noise
    draws; Salman et al. 2019, Section 3 and Appendix); any other model is a SmoothAdvError before
    the first step, even at eps = 0. No backpropagation through the network. Same steps, step
    length, projection and random start as `PGDL2`; much weaker than backpropagation (Salman et al.
    2019, Appendix), offered for comparison only.
    """

    def _accepts(self, model: Model) -> None:
        if not isinstance(model, GradientFreeModel):
            raise SmoothAdvError("the gradient-free attack needs a model with ascent_direction(x, y), such as "
                                 "smoothing.SoftSmoothed (the smoothed classifier)")

    def _direction(self, model: Model, x_adv: Tensor, y: Tensor, top_label: int) -> Tensor:
        with torch.no_grad():
            return model.ascent_direction(x_adv, y)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DDN(_L2Attack):
    """Decoupled Direction and Norm (Rony et al., CVPR 2019), as SmoothAdv adapted it (Salman et al. 2019, Section 3).

    Keeps a norm budget rho (starting at `init_norm`) that shrinks by (1 - gamma) while the point is
    adversarial and grows by (1 + gamma) otherwise (capped at the largest possible perturbation);
    each step moves along the normalized gradient with a cosine-annealed step (1 -> 0.01), rescales
    delta to norm rho, quantizes to 256 levels (`quantize`) and clamps to [0, 1]. Returns the
    smallest adversarial delta seen, scaled into the eps-ball (and re-quantized, re-projected so
    the contract holds exactly); **an example for which no adversarial point was found is
    returned unchanged**, as in the original. "Adversarial" means argmax of the model's output
    differs from y (for `SoftSmoothed`, the argmax of the averaged softmax; the original used a
    hard vote over the m noisy copies).
    """

    eps: float = setting(help="attack L2 radius in [0, 1] pixels", limit=NONNEGATIVE)
    steps: int = setting(10, "attack steps T", limit=AT_LEAST_ONE)
    gamma: float = setting(0.05, "DDN norm update factor", flag="--ddn-gamma", limit=PROBABILITY)
    init_norm: float = setting(1.0, "DDN initial norm (training replaces it by the warm-up eps each epoch, as the "
                               "original)", flag="--ddn-init-norm", limit=POSITIVE)
    quantize: bool = setting(True, "DDN: quantize to `levels` grey levels after each step", flag="--ddn-quantize")
    levels: int = setting(256, "DDN: grey levels of the quantization", flag="--ddn-levels", limit=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        _check(self.eps, self.steps)
        if not 0 < self.gamma < 1:
            raise SmoothAdvError(f"DDN gamma must be in (0, 1), got {self.gamma}")
        if not self.init_norm > 0:
            raise SmoothAdvError(f"DDN init norm must be > 0, got {self.init_norm}")

    def _quantize(self, x: Tensor, delta: Tensor, domain: Domain = (0.0, 1.0)) -> Tensor:
        """x + delta rounded to `levels` values across the domain's box (none without a box), minus x."""
        if not self.quantize or domain is None:
            return delta
        lo, span, scale = domain[0], domain[1] - domain[0], self.levels - 1
        if (lo, span) == (0.0, 1.0):  # the SmoothAdv code's arithmetic, bit for bit
            return ((x + delta) * scale).round() / scale - x
        return ((x + delta - lo) / span * scale).round() / scale * span + lo - x

    def _attack(self, model: Model, x: Tensor, y: Tensor, top_label: int, generator: torch.Generator | None,
                domain: Domain) -> Tensor:
        batch = x.shape[0]
        delta = torch.zeros_like(x)
        norm = torch.full((batch,), float(self.init_norm), device=x.device, dtype=x.dtype)
        worst_norm = l2_norm(torch.maximum(x - domain[0], domain[1] - x)) if domain is not None \
            else torch.full((batch,), math.inf, device=x.device, dtype=x.dtype)
        best_l2 = torch.full((batch,), math.inf, device=x.device, dtype=x.dtype)
        best_delta = torch.zeros_like(x)
        for step in range(1, self.steps + 1):
            lr = 0.01 + (1 - 0.01) * (1 + math.cos(math.pi * step / self.steps)) / 2  # cosine, stepped first
            l2 = l2_norm(delta)
            grad, logits = _input_grad(model, x + delta, y, top_label)
            is_adv = logits.argmax(1) != y
            better = is_adv & (l2 < best_l2)
            best_l2 = torch.where(better, l2, best_l2)
            best_delta[better] = delta[better]
            delta = delta + lr * _normalize(grad, generator)
            norm = torch.minimum(torch.where(is_adv, norm * (1 - self.gamma), norm * (1 + self.gamma)), worst_norm)
            delta = delta * _view(norm / l2_norm(delta).clamp_min(1e-12), delta)
            delta = x + self._quantize(x, delta, domain)
            delta = (delta.clamp(domain[0], domain[1]) if domain is not None else delta) - x
        best_delta = project(x, self._quantize(x, project(x, best_delta, self.eps, domain), domain), self.eps, domain)
        best_delta[torch.isinf(best_l2)] = 0.0  # nothing adversarial found: x itself (not re-quantized)
        return (x + best_delta).detach()


ATTACKS: dict[str, type] = {"pgd": PGDL2, "ddn": DDN}
"""Attack name (the CLI's --attack) -> class. `SteinPGDL2` is PGD with --gradient-free, not a separate name."""


def get_attack(name: str) -> type:
    """The attack class called `name` ('pgd' or 'ddn'); SmoothAdvError for an unknown name."""
    try:
        return ATTACKS[name.lower()]
    except (KeyError, AttributeError):
        raise SmoothAdvError(f"attack must be one of {', '.join(ATTACKS)}, got {name!r}") from None


ATTACK_NAME = setting("pgd", "attack on the smoothed soft classifier", choices=tuple(ATTACKS), flag="--attack")
GRADIENT_FREE = setting(False, "PGD: Stein gradient estimate from forward passes only (no backpropagation; much "
                        "weaker, for comparison)", flag="--gradient-free")


def attack_settings() -> dict[str, tuple[Any, Any, tuple[str, ...]]]:
    """Every attack's settings by recipe key: key -> (field, type, names of the attacks that have it).

    The keys are the command line's flags without dashes (`eps`, `steps`, `random_start`, `ddn_gamma`, ...)
    plus `attack` (the name) and `gradient_free` (PGD's Stein variant). `build_attack` takes them."""
    found: dict[str, tuple[Any, Any, tuple[str, ...]]] = {
        "attack": (ATTACK_NAME, str, tuple(ATTACKS)), "gradient_free": (GRADIENT_FREE, bool, ("pgd",))}
    for name, cls in ATTACKS.items():
        for _, (field, kind) in fields_of(cls).items():
            key = recipe_key(field)
            owners = found[key][2] if key in found else ()
            found[key] = (found[key][0] if key in found else field, kind, (*owners, name))
    return found


def _own_settings(cls: type, attack: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """field name -> value of the settings of `cls` in `values` (by recipe key), each converted and checked
    against its limit; a setting of another attack (e.g. `ddn_gamma` for PGD) is refused, one line, unless it
    is None or False (off); None means the field's default (or `build_attack`'s rule)."""
    kinds = fields_of(cls)
    known = {recipe_key(field): name for name, (field, _) in kinds.items()}
    others = sorted(key for key, value in values.items() if key not in known and value not in (None, False))
    if others:
        raise SmoothAdvError(f"{', '.join(others)} {'is not a setting' if len(others) == 1 else 'are not settings'} "
                             f"of the {attack} attack")
    kwargs = {known[key]: convert(value, kinds[known[key]][1], key) for key, value in values.items()
              if key in known and value is not None}
    for name, value in kwargs.items():
        limit = kinds[name][0].metadata.get("limit")
        if limit is not None and not limit[0](value):
            raise SmoothAdvError(f"{recipe_key(kinds[name][0])} must be {limit[1]}, got {value!r}")
    return kwargs


#: the settings whose default (None) is `build_attack`'s rule for DDN at each eps, not the dataclass default
DDN_RULE_KEYS = ("ddn_gamma", "ddn_init_norm")


def attack_recipe(values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The complete recipe of the attack `values` name, without its radius: recipe key -> value for `attack`
    (the name), `gradient_free` for PGD, and every setting of that attack, given in `values`, else in
    `defaults`, else the attack's own default (DDN's `ddn_gamma` and `ddn_init_norm`: None, `build_attack`'s
    rule at each eps). `build_attack(eps=e, **recipe)` builds the attack at radius e; an attack run records it
    (`run.record`). Checked as `build_attack` checks (types, limits, another attack's settings refused unless
    off); SmoothAdvError, one line. `eps` is not a key: a run takes several radii."""
    given = {**(defaults or {}), **{key: value for key, value in values.items() if value is not None}}
    if "eps" in given:
        raise SmoothAdvError("eps is the attack run's radii, not a setting of its attack recipe")
    name = given.pop("attack", ATTACK_NAME.default)
    cls = get_attack(name if isinstance(name, str) else "")
    name = name.lower()
    gradient_free = convert(given.pop("gradient_free", False), bool, "gradient_free")
    if gradient_free and cls is not PGDL2:
        raise SmoothAdvError("gradient_free is a variant of PGD; drop it or use attack pgd")
    kwargs = _own_settings(cls, name, given)
    recipe: dict[str, Any] = {"attack": name, **({"gradient_free": gradient_free} if cls is PGDL2 else {})}
    for field_name, (field, _) in fields_of(cls).items():
        key = recipe_key(field)
        if key != "eps":
            recipe[key] = kwargs.get(field_name, None if cls is DDN and key in DDN_RULE_KEYS else field.default)
    return recipe


def build_attack(attack: str = "pgd", eps: float = 0.5, steps: int = 10, *, gradient_free: bool = False,
                 **values: Any) -> Attack:
    """The attack called `attack` ("pgd" or "ddn") with settings given by recipe key (`attack_settings`).

    `gradient_free` makes PGD's Stein variant (`SteinPGDL2`). A setting of another attack (e.g.
    `ddn_gamma` for PGD) is refused, one line, unless it is None or False (off). DDN's `ddn_gamma` and
    `ddn_init_norm`, when not given or None, follow Salman et al.'s prediction script's rule: the norm may shrink
    from eps to 3/510 in T steps, gamma = 1 - (3/510/eps)^(1/T), and it starts at eps (at least 1e-3). A deliberate
    deviation: predict.py itself starts at its --init-norm-DDN default, 256/256 = 1.0, whatever eps; we start where
    its gamma rule assumes (and where training's warm-up starts DDN each epoch). Pass `ddn_init_norm=1.0` for the
    script's behaviour.
    """
    cls = get_attack(attack)
    if gradient_free and cls is not PGDL2:
        raise SmoothAdvError("gradient_free is a variant of PGD; drop it or use attack pgd")
    kwargs = _own_settings(cls, attack, values)
    eps, steps = convert(eps, float, "eps"), convert(steps, int, "steps")
    if cls is DDN:
        kwargs.setdefault("gamma", 1 - (3 / 510 / eps) ** (1 / steps) if eps > 3 / 510 else 0.05)
        kwargs.setdefault("init_norm", max(eps, 1e-3))
    if gradient_free:
        cls = SteinPGDL2
    built: Attack = cls(eps, steps, **kwargs)
    return built
