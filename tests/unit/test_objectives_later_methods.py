"""The training methods after SmoothAdv (Stability, Consistency, MACER, SmoothMix, CAT-RS): values on tiny models
where the answer is known, and
one epoch of each on the synthetic dataset lowering its own loss. CAT-RS from `smoothadv smooth-prediction` through
the command line: tests/e2e/test_cli_objectives.py.

Every test is seeded and runs in about a second on one CPU thread.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from smoothadv.attacks import PGDL2
from smoothadv.data import get_dataset
from smoothadv.errors import SmoothAdvError
from smoothadv.models import build_model
from smoothadv.objectives import (
    CATRS,
    MACER,
    OBJECTIVES,
    Consistency,
    ConsistencyRegularizer,
    SmoothAdv,
    SmoothMix,
    StabilityTraining,
    build_objective,
    catrs_noise_attack,
    catrs_selection,
    smoothmix_attack,
    uniform_draws,
)
from smoothadv.train import batches, train_epoch
from smoothadv.train import recipe as train_recipe


def _toy(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return build_model("toy_cnn", "synthetic")


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """f(x) = W flatten(x) + b, with the given weights."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    return model


# ------------------------------------------------------------------ stability training


def test_stability_is_clean_cross_entropy_plus_lambda_soft_cross_entropy_to_the_noisy_pass() -> None:
    model = _toy()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,))
    out = StabilityTraining(0.5, lbd=3.0)(model, x, y, torch.Generator().manual_seed(4))
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    clean_logits, noisy_logits = model(x), model(noisy)
    soft = -(clean_logits.softmax(1) * noisy_logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(out.loss, F.cross_entropy(clean_logits, y) + 3.0 * soft, atol=1e-6)
    assert torch.allclose(out.logits, noisy_logits) and torch.equal(out.targets, y)
    # sigma = 0: the soft term is the entropy of the clean prediction, and its gradient reaches the target
    # (not detached, as in the original code): lambda = 1 with a zero classification weight is the entropy
    sigma_zero = StabilityTraining(0.0, lbd=1.0)(model, x, y)
    entropy = -(clean_logits.softmax(1) * clean_logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(sigma_zero.loss, F.cross_entropy(clean_logits, y) + entropy, atol=1e-6)


# ------------------------------------------------------------------ consistency regularization


def test_consistency_kl_is_zero_when_all_noisy_copies_predict_the_same() -> None:
    logits = torch.randn(5, 1, 4).repeat(1, 3, 1)  # 5 images, 3 identical copies each
    assert float(ConsistencyRegularizer(lbd=7.0, eta=0.0)(logits)) == pytest.approx(0.0, abs=1e-7)
    # the entropy term is then eta x H(p) of the common prediction
    p = logits[:, 0].softmax(1)
    entropy = -(p * p.log()).sum(1).mean()
    assert torch.allclose(ConsistencyRegularizer(lbd=7.0, eta=0.5)(logits), 0.5 * entropy, atol=1e-6)
    # a model that ignores its input predicts the same for every copy: the objective is CE + eta H exactly
    constant = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    with torch.no_grad():
        constant[1].weight.zero_()
        constant[1].bias.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1]))
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 2, 2])
    out = Consistency(0.5, m=4, lbd=10.0, eta=0.0)(constant, x, y, torch.Generator().manual_seed(0))
    assert torch.allclose(out.loss, F.cross_entropy(constant(x), y), atol=1e-6)


def test_consistency_kl_matches_its_definition_when_copies_differ() -> None:
    logits = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(1))
    q = logits.softmax(2)
    p = q.mean(1, keepdim=True)
    kl = (p * (p.log() - q.log())).sum(2).mean(1)  # (1/m) sum_j KL(p || q_j)
    entropy = -(p * p.log()).sum(2).squeeze(1)
    assert float(kl.min()) > 0
    assert torch.allclose(ConsistencyRegularizer(3.0, 0.25)(logits), (3.0 * kl + 0.25 * entropy).mean(), atol=1e-6)


def test_consistency_composes_with_smoothadv() -> None:
    # eps = 0 leaves x unattacked: SmoothAdv + consistency on m copies is then Consistency on the same draws
    model = _toy()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,))
    alone = Consistency(0.25, m=3, lbd=4.0, eta=0.5)(model, x, y, torch.Generator().manual_seed(2))
    composed = SmoothAdv(0.25, PGDL2(0.0), m=3, multi_noise=True, consistency=True, lbd=4.0, eta=0.5)
    out = composed(model, x, y, torch.Generator().manual_seed(2))
    assert torch.allclose(out.loss, alone.loss, atol=1e-6) and torch.equal(out.targets, alone.targets)
    plain = SmoothAdv(0.25, PGDL2(0.0), m=3, multi_noise=True)(model, x, y, torch.Generator().manual_seed(2))
    assert float((out.loss - plain.loss).detach()) > 0  # the regularizer is added, not substituted
    assert composed.steps_per_batch == Consistency(0.25, m=3).steps_per_batch == 3
    assert "lbd" not in SmoothAdv(0.25, PGDL2(0.5)).describe()  # plain SmoothAdv records what it always did
    assert composed.describe()["consistency"] is True and composed.describe()["lbd"] == 4.0
    with pytest.raises(SmoothAdvError, match="needs multi_noise=True and m >= 2"):
        SmoothAdv(0.25, PGDL2(0.5), m=2, consistency=True)


# ------------------------------------------------------------------ MACER


def test_macer_hinge_on_a_linear_model_equals_its_closed_form() -> None:
    # Two classes, f(x) = (w.x, -w.x): with d_ij = 2 w.(x_i + delta_ij) and a_i = mean_j sigmoid(beta d_ij),
    # the beta-soft classifier's top two are max(a, 1 - a) and min(a, 1 - a), so xi_i = 2 Phi^-1(max(a_i, 1 - a_i))
    # (Phi^-1(1 - p) = -Phi^-1(p)); the hinge is (sigma / 2) (gamma - xi_i) on the images whose soft prediction is
    # right and whose xi is finite and at most gamma.
    from scipy.stats import norm

    sigma, m, beta, gamma, lbd = 0.5, 3, 2.0, 2.7, 4.0
    w = torch.tensor([0.4, -0.3, 0.2, 0.1])
    model = _linear(torch.stack([w, -w]), torch.zeros(2))
    x = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.2, 0.0], [0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 1.0, 1.0],
                      [0.9, 0.1, 0.8, 0.7]])
    y = torch.tensor([0, 1, 1, 0, 0])  # image 2 is predicted as class 0: wrong, so not in the hinge
    objective = MACER(sigma, m=m, lbd=lbd, beta=beta, gamma=gamma)
    out = objective(model, x.view(5, 1, 2, 2), y, torch.Generator().manual_seed(0))
    noise = torch.randn((5, m, 1, 2, 2), generator=torch.Generator().manual_seed(0)).double().view(5, m, 4) * sigma
    d = 2 * ((x.double().unsqueeze(1) + noise) @ w.double())  # (5, m)
    a = torch.sigmoid(beta * d).mean(1)
    top = torch.maximum(a, 1 - a)
    xi = 2 * torch.from_numpy(norm.ppf(top.numpy()))
    correct = torch.where(a >= 0.5, 0, 1) == y
    kept = correct & (xi <= gamma)
    assert kept.tolist() == [True, True, False, False, True]  # image 3's margin exceeds gamma: no hinge either
    hinge = (sigma / 2 * (gamma - xi)).clamp(min=0) * correct
    p_true = torch.where(y == 0, torch.sigmoid(d).mean(1), 1 - torch.sigmoid(d).mean(1))
    expected = (-torch.log(p_true + 1e-10).sum() + lbd * hinge.sum()) / 5
    assert abs(float(out.loss.detach()) - float(expected)) < 1e-5
    # deferred: no robustness term in the first `deferred` epochs, the classification term alone
    deferred = MACER(sigma, m=m, lbd=lbd, beta=beta, gamma=gamma, deferred=2)
    assert [deferred.at_epoch(e).lbd for e in range(4)] == [0.0, 0.0, lbd, lbd]
    early = deferred.at_epoch(1)(model, x.view(5, 1, 2, 2), y, torch.Generator().manual_seed(0))
    assert abs(float(early.loss.detach()) - float(-torch.log(p_true + 1e-10).sum() / 5)) < 1e-5


def test_macer_drops_images_with_an_infinite_margin_without_nan_gradients() -> None:
    # a confident model: p1 rounds to 1 in float32, Phi^-1(p1) = inf; the image is dropped and gradients stay finite
    model = _linear(torch.tensor([[50.0, 0.0], [-50.0, 0.0]]), torch.zeros(2))
    x, y = torch.tensor([[[[1.0, 0.0]]], [[[0.01, 0.0]]]]), torch.tensor([0, 0])
    out = MACER(0.01, m=2, lbd=1.0, beta=16.0, gamma=8.0)(model, x, y, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------ SmoothMix


def test_smoothmix_target_is_the_stated_convex_combination() -> None:
    gen = torch.Generator().manual_seed(5)
    x_init, x_adv = torch.rand(4, 1, 2, 2, generator=gen), torch.rand(4, 1, 2, 2, generator=gen)
    average = torch.rand(4, 5, generator=gen).softmax(1)
    lam = torch.tensor([0.0, 0.1, 0.25, 0.5])
    x_mix, target = SmoothMix(0.25).mixed(x_init, x_adv, average, lam)
    for i, weight in enumerate(lam.tolist()):
        assert torch.allclose(x_mix[i], (1 - weight) * x_init[i] + weight * x_adv[i])
        assert torch.allclose(target[i], (1 - weight) * average[i] + weight * torch.full((5,), 0.2))
    assert torch.allclose(target.sum(1), torch.ones(4)) and torch.equal(target[0], average[0])


def test_smoothmix_loss_recomputed_from_its_definition() -> None:
    # The whole loss by hand from the same draws: noise (b, m) first, then lambda ~ U[0, 1/2] per image (U(0, 1)
    # made as Phi(z) of a normal draw, so that torchrun ranks draw every example's lambda as one process would).
    model = _toy(3)
    x, y = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0, 1])
    objective = SmoothMix(0.25, m=2, steps=3, step_size=0.5, eta=5.0, mix_step=1, warmup=4).at_epoch(1)
    assert objective.ramp == 0.5
    out = objective(model, x, y, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    noise = torch.randn((6, 2, 3, 8, 8), generator=gen) * 0.25
    lam = torch.special.ndtr(torch.randn(6, generator=gen)) / 2  # U(0, 1) as Phi(z), half of it
    model.eval()
    x_init, x_adv = smoothmix_attack(model, x, y, noise, step_size=0.5, steps=3, mix_step=1)
    model.train()
    step = x_init - x  # the one-step adversary, moved 0.5 (the step size); its radius is capped at ramp x 0.5 = 0.25
    assert 0.25 < float(step.flatten(1).norm(dim=1).max()) <= 0.5 + 1e-6
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 3 * 0.5 + 1e-5  # no eps-ball: up to T step_size
    norms = step.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x_init = x + step * torch.clamp(0.25 / norms, max=1.0)
    logits = model((x_init.unsqueeze(1) + noise).flatten(0, 1))  # the clean side is x_init, as in the original
    average = logits.softmax(1).view(6, 2, 4).mean(1)
    x_mix = (1 - lam.view(-1, 1, 1, 1)) * x_init + lam.view(-1, 1, 1, 1) * x_adv
    target = (1 - lam.view(-1, 1)) * average + lam.view(-1, 1) / 4
    log_q = model((x_mix.unsqueeze(1) + noise).flatten(0, 1)).log_softmax(1).view(6, 2, 4)
    kl = (target.unsqueeze(1) * (target.unsqueeze(1).log() - log_q)).sum(2)  # (b, m)
    correct = (average.argmax(1) == y).float().unsqueeze(1)
    expected = F.cross_entropy(logits, y.repeat_interleave(2)) + 5.0 * 0.5 * (correct * kl).mean()
    assert torch.allclose(out.loss, expected, atol=1e-5)
    # mix_step = 0: the clean side of the mixup is x itself
    start, _ = smoothmix_attack(model, x, y, noise, step_size=0.5, steps=2, mix_step=0)
    assert torch.equal(start, x)


# ------------------------------------------------------------------ CAT-RS


def test_catrs_selection_follows_its_binomial_rule_with_a_seeded_count() -> None:
    # K ~ Binomial(m, a), then max(K, 1): 20,000 draws per accuracy, every count within 4.5 standard deviations
    from scipy.stats import binom

    m, draws = 4, 20_000
    levels = [0.0, 0.25, 0.5, 0.9, 1.0]
    accuracy = torch.tensor(levels).repeat_interleave(draws)
    uniform = uniform_draws((len(accuracy), m), accuracy, torch.Generator().manual_seed(0))
    kept = catrs_selection(accuracy, uniform).view(len(levels), draws)
    assert int(kept.min()) >= 1 and int(kept.max()) <= m
    for row, a in zip(kept, levels):
        pmf = binom.pmf(range(m + 1), m, a)
        expected = [pmf[0] + pmf[1], *pmf[2:]]  # K = 0 becomes 1
        for k, p in zip(range(1, m + 1), expected):
            count = int((row == k).sum())
            assert abs(count - draws * p) <= 4.5 * math.sqrt(draws * p * (1 - p)) + 1e-9, (a, k, count, draws * p)
    assert bool((kept[0] == 1).all()) and bool((kept[-1] == m).all())  # a = 0 keeps one copy, a = 1 all


def test_catrs_noise_attack_keeps_each_draws_mean_and_scale_and_raises_the_kl() -> None:
    model = _toy(4)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn((3, 2, 3, 8, 8), generator=torch.Generator().manual_seed(3)) * 0.25
    target = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    attacked = catrs_noise_attack(model, x, noise, target, eps=1.0, steps=3)

    def moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = t.flatten(2)
        return rows.mean(2), rows.pow(2).mean(2).sqrt()

    (mean, rms), (mean0, rms0) = moments(attacked), moments(noise)
    assert torch.allclose(mean, mean0, atol=1e-6)  # the mean is restored exactly
    # the scale nearly: the original divides the centred noise by its uncentred RMS, so the result's
    # mean square is rms0^2 (1 - mean^2 / rms^2) + mean0^2 with the attacked draw's mean and rms
    assert torch.allclose(rms, rms0, rtol=0.02)
    assert float((attacked - noise).flatten(2).norm(dim=2).max()) <= 1.1  # the projection, then re-standardization

    def kl(n: torch.Tensor) -> float:
        log_q = model((x.unsqueeze(1) + n).flatten(0, 1)).log_softmax(1)
        return float(F.kl_div(log_q, target.repeat_interleave(2, 0), reduction="sum").detach())

    assert kl(attacked) > kl(noise)


def test_catrs_loss_recomputed_from_its_definition() -> None:
    model = _toy(5)
    x, y = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0, 1])
    pi = torch.rand(10, 4, generator=torch.Generator().manual_seed(2)).softmax(1)
    index = torch.tensor([9, 0, 3, 3, 5, 7])
    objective = CATRS(0.25, m=3, eps=0.5, steps=2, lbd=2.0, pi=pi)
    out = objective(model, x, y, torch.Generator().manual_seed(8), index=index)
    gen = torch.Generator().manual_seed(8)
    noise = torch.randn((6, 3, 3, 8, 8), generator=gen) * 0.25
    logits0 = model((x.unsqueeze(1) + noise).flatten(0, 1)).view(6, 3, 4)
    accuracy = (logits0.argmax(2) == y.view(-1, 1)).float().mean(1)
    kept = catrs_selection(accuracy, torch.special.ndtr(torch.randn((6, 3), generator=gen)))
    losses = F.cross_entropy(logits0.flatten(0, 1), y.repeat_interleave(3), reduction="none").view(6, 3)
    low = torch.stack([losses[i].sort().values[:k].sum() / 3 for i, k in enumerate(kept.tolist())])
    attacked = catrs_noise_attack(model, x, noise, pi[index], eps=0.5, steps=2)
    log_q = model((x.unsqueeze(1) + attacked).flatten(0, 1)).log_softmax(1).view(6, 3, 4)
    target = pi[index].unsqueeze(1)
    high = (target * (target.log() - log_q)).sum(2).max(1).values
    expected = (low + 2.0 * (kept == 3).float() * high).mean()
    assert torch.allclose(out.loss, expected, atol=1e-5)
    with pytest.raises(SmoothAdvError, match="training-set index"):
        objective(model, x, y)
    with pytest.raises(SmoothAdvError, match="--smoothed-prediction"):
        CATRS(0.25)
    assert "pi" not in objective.describe() and objective.describe()["lbd"] == 2.0


# ------------------------------------------------------------------ every objective learns

METHODS = {
    "stability": {"lbd": 2.0},
    "consistency": {"m": 2, "lbd": 10.0, "eta": 0.5},
    "macer": {"m": 8, "lbd": 12.0, "beta": 16.0, "gamma": 8.0},
    "smoothmix": {"m": 2, "steps": 2, "step_size": 0.5, "eta": 5.0, "mix_step": 1, "warmup": 1},
    # CAT-RS's loss sums more terms as more copies become correct (K grows, then L_high switches on), so it can
    # rise while the model improves; with the confidence mask the selection depends on pi only, and the loss
    # before and after the epoch are comparable
    "catrs": {"m": 2, "eps": 0.5, "steps": 2, "lbd": 1.0, "confidence_mask": True},
}


def _synthetic_pi(data) -> torch.Tensor:
    """A stand-in smoothed prediction for the synthetic training set: 0.8 on the label, 0.2 spread evenly."""
    labels = data.dataset.labels if isinstance(data, Subset) else data.labels
    return F.one_hot(labels, 4).float() * 0.8 + 0.05


def _build(name: str, data) -> object:
    if name == "catrs":
        return CATRS(0.25, pi=_synthetic_pi(data), **METHODS[name])
    return build_objective(name, 0.25, METHODS[name])


def _epoch_lowers_the_loss(objective, data, *, lr: float = 0.05, seed: int = 2, factor: float = 0.9) -> None:
    model = _toy(seed)

    def loss() -> float:
        x, y, index = next(batches(data, len(data), shuffle=False, with_index=True))
        extra = {"index": index} if objective.uses_index else {}
        return float(objective(model, x, y, torch.Generator().manual_seed(3), **extra).loss.detach())

    before = loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    shuffled = batches(data, 64, shuffle=True, generator=torch.Generator().manual_seed(0),
                       with_index=objective.uses_index)
    train_epoch(model, objective, optimizer, shuffled, torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    after = loss()
    assert after < factor * before, (before, after)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_epoch_lowers_each_methods_own_loss(name: str) -> None:
    data = Subset(get_dataset("synthetic", "train"), range(256))
    _epoch_lowers_the_loss(_build(name, data), data)


def test_every_new_method_is_registered_and_recorded_with_its_settings(tmp_path) -> None:
    from smoothadv.evaluate import SMOOTH_PREDICTION_COLUMNS

    table = tmp_path / "pi.tsv"
    table.write_text("\t".join(SMOOTH_PREDICTION_COLUMNS) + "\n0\t1\t1\t1\t1,7,2,0\t0:00:01\n")
    for name, options in METHODS.items():
        assert name in OBJECTIVES
        extra = {"smoothed_prediction": str(table)} if name == "catrs" else {}
        settings, objective = train_recipe({"objective": name, "dataset": "synthetic", "out": "unused", **options,
                                            **extra})
        described = objective.describe()
        assert described["name"] == type(objective).__name__ and described["sigma"] == settings.sigma
        assert all(described[key] == value for key, value in {**options, **extra}.items())


@pytest.mark.parametrize("make, message", [
    (lambda: StabilityTraining(0.25, lbd=-1.0), "StabilityTraining lbd must be a number >= 0"),
    (lambda: StabilityTraining(-0.25), "sigma"),
    (lambda: build_objective("stability", 0.25, {"lbd": "2"}), "lbd must be a number"),
])
def test_bad_hyperparameters_are_one_line_errors(make, message) -> None:
    with pytest.raises(SmoothAdvError, match=message) as info:
        make()
    assert "\n" not in str(info.value)



def test_a_smoothmix_run_recorded_with_alpha_resumes_under_step_size(tmp_path) -> None:
    """SmoothMix's attack step size was recorded as `alpha` before it became `step_size`: such a run resumes (the
    recorded description is read under today's names), while a recipe with the old key is told the new one."""
    from smoothadv.files import atomic_torch_save
    from smoothadv.models import read_checkpoint
    from smoothadv.settings import TrainSettings
    from smoothadv.train import fit

    settings = dict(dataset="synthetic", arch="toy_cnn", out_dir=tmp_path / "run", sigma=0.25, epochs=1, batch_size=8,
                    train_subset=16, eval_subset=8, progress=False, device="cpu")
    objective = SmoothMix(0.25, m=2, steps=1, step_size=0.5, warmup=1)
    path = fit(TrainSettings(**settings), objective)
    saved = read_checkpoint(path)
    described = saved["objective"]
    saved["objective"] = {("alpha" if key == "step_size" else key): value for key, value in described.items()}
    atomic_torch_save(saved, path)  # as an earlier version wrote it
    fit(TrainSettings(**{**settings, "epochs": 2, "resume": True}), objective)
    assert read_checkpoint(path)["epoch"] == 2
    with pytest.raises(SmoothAdvError, match="cannot resume"):  # a different step size is still refused
        fit(TrainSettings(**{**settings, "epochs": 3, "resume": True}), SmoothMix(0.25, m=2, steps=1, step_size=0.7,
                                                                                 warmup=1))
    with pytest.raises(SmoothAdvError, match="alpha of the smoothmix objective is now called step_size"):
        train_recipe({"objective": "smoothmix", "alpha": 1.0, "out": str(tmp_path / "x")})
