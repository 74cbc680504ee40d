"""smoothadv.diffusion: loading a diffusers DDPM, the diffusion denoiser (Carlini et al. 2023), the DDPM trainer.

Everything runs on tiny randomly initialised UNets (1x8x8 or 3x8x8 images) saved with diffusers'
save_pretrained into tmp directories; skipped when the optional dependency diffusers is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ddpm_checkpoint,
    ddpm_scheduler,
    ddpm_train_settings,
    one_line_error,
    save_tiny_ddpm,
    tiny_unet,
)
from torch import nn

diffusers = pytest.importorskip("diffusers")

from smoothadv.diffusion import (  # noqa: E402
    CPU_CHUNK,
    DiffusionDenoiser,
    DiffusionModel,
    ddim_timesteps,
    diffusion_denoiser,
    diffusion_timestep,
    load_diffusion,
    train_ddpm,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A DDPMPipeline directory (unet/, scheduler/, model_index.json) holding the tiny UNet; read-only."""
    path = tmp_path_factory.mktemp("ddpm") / "pipeline"
    return save_tiny_ddpm(path, channels=1)


@pytest.fixture(scope="module")
def model(pipeline_dir) -> DiffusionModel:
    return load_diffusion(pipeline_dir)


# ------------------------------------------------------------------ loading


def test_load_round_trip(pipeline_dir, model):
    original = tiny_unet()
    assert model.shape == (1, 8, 8)
    assert model.prediction_type == "epsilon" and not model.learned_variance
    assert model.num_train_timesteps == 1000
    loaded = model.unet.state_dict()
    assert set(loaded) == set(original.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in original.state_dict().items())
    assert torch.equal(model.alphas_cumprod, ddpm_scheduler().alphas_cumprod.double())


def test_bare_unet_layout(tmp_path):
    """A UNet directory (config.json + weights) with scheduler_config.json beside it loads too."""
    tiny_unet(1).save_pretrained(tmp_path)
    ddpm_scheduler().save_pretrained(tmp_path)
    loaded = load_diffusion(tmp_path)
    assert loaded.shape == (1, 8, 8)
    assert loaded.provenance()["unet"] == "."
    assert loaded.provenance()["scheduler_config"] == "scheduler_config.json"


def test_provenance_digests(pipeline_dir, model):
    record = model.provenance()

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    weights = pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert record["weights_sha256"] == {"unet/diffusion_pytorch_model.safetensors": sha(weights)}
    assert record["scheduler_config_sha256"] == sha(pipeline_dir / "scheduler" / "scheduler_config.json")
    assert record["unet_config_sha256"] == sha(pipeline_dir / "unet" / "config.json")
    assert record["diffusers"] == diffusers.__version__
    assert record["parameters"] == sum(p.numel() for p in model.unet.parameters())
    assert record["shape"] == [1, 8, 8] and record["prediction_type"] == "epsilon"
    json.dumps(record)  # a JSON record


def test_load_errors(tmp_path, pipeline_dir):
    one_line_error(lambda: load_diffusion(tmp_path / "missing"), "missing", "no such directory")
    one_line_error(lambda: load_diffusion(tmp_path), str(tmp_path), "no UNet config")
    bad = tmp_path / "vae"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    one_line_error(lambda: load_diffusion(bad), str(bad), "AutoencoderKL", "not a UNet2DModel")
    (bad / "config.json").write_text("{not json")
    one_line_error(lambda: load_diffusion(bad), "not a JSON file")
    copy = tmp_path / "copy"
    shutil.copytree(pipeline_dir, copy)
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    one_line_error(lambda: load_diffusion(copy), str(copy), "no UNet weights")
    shutil.rmtree(copy)
    shutil.copytree(pipeline_dir, copy)
    shutil.rmtree(copy / "scheduler")
    one_line_error(lambda: load_diffusion(copy), "no scheduler config")
    shutil.rmtree(copy)
    shutil.copytree(pipeline_dir, copy)  # weights that do not fit the config
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [16, 32]}))
    one_line_error(lambda: load_diffusion(copy), "cannot load the UNet")
    shutil.rmtree(copy)
    shutil.copytree(pipeline_dir, copy)
    config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "magic"}))
    one_line_error(lambda: load_diffusion(copy), "prediction_type 'magic'")


def test_diffusers_missing(monkeypatch, pipeline_dir):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    one_line_error(lambda: load_diffusion(pipeline_dir), "needs the optional dependency diffusers",
                   "pip install 'smoothadv[diffusion]'")


def test_weights_replaced_while_read_are_refused(monkeypatch, tmp_path, pipeline_dir):
    """The weights are hashed before and after diffusers reads them: a file a training run rewrites meanwhile is
    refused, so the recorded digest is always of the weights loaded."""
    path = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, path)
    [weights] = (path / "unet").glob("diffusion_pytorch_model*")
    real = diffusers.UNet2DModel.from_pretrained

    def rewritten_while_read(*args, **kwargs):
        unet = real(*args, **kwargs)
        save_tiny_ddpm(path, seed=1, channels=1)
        return unet

    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", rewritten_while_read)
    one_line_error(lambda: load_diffusion(path), "changed while they were being read")
    monkeypatch.undo()
    assert load_diffusion(path).provenance()["weights_sha256"] == {
        str(weights.relative_to(path)): hashlib.sha256(weights.read_bytes()).hexdigest()}


# ------------------------------------------------------------------ the denoiser


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_timestep_closed_form(model, sigma):
    """t* is the authors' rule (their certify.py): count up from t = 1 until sqrt(1 - abar) / sqrt(abar) >= 2 sigma."""
    abar = [float(a) for a in ddpm_scheduler().alphas_cumprod.double()]
    level = [math.sqrt(1 - a) / math.sqrt(a) for a in abar]
    t = 0
    while True:  # written as the authors wrote it
        t += 1
        if level[t] >= 2 * sigma:
            break
    assert model.timestep(sigma) == t == DiffusionDenoiser(model, sigma).t_star
    # the nearest timestep (the paper's sigma^2 = (1 - abar) / abar, rounded) or the one after it
    gaps = [abs(v - 2 * sigma) for v in level]
    assert t - gaps.index(min(gaps)) in (0, 1)
    assert level[t - 1] < 2 * sigma <= level[t]


def test_timestep_of_the_authors_rule_at_its_edges():
    abar = torch.tensor([0.99, 0.96, 0.5, 0.1], dtype=torch.float64)  # levels 0.1005, 0.2041, 1, 3 (x 1/2: sigma)
    assert diffusion_timestep(abar, 0.01) == 1  # never t = 0: the authors count from 1
    assert diffusion_timestep(abar, 0.5) == 2  # exactly reached: that timestep
    assert diffusion_timestep(abar, 0.5000001) == 3
    assert diffusion_timestep(abar, 1.0) == 3  # the last timestep is on the schedule
    assert diffusion_timestep(abar, 1.5) == 3
    one_line_error(lambda: diffusion_timestep(abar, 1.51, "m"), "sigma 1.51 is beyond the noise schedule of m",
                   "last timestep 3", "up to 1.5")


def test_sigma_errors(model):
    one_line_error(lambda: DiffusionDenoiser(model, 1000.0), "sigma 1000", "beyond the noise schedule")
    one_line_error(lambda: diffusion_timestep(model.alphas_cumprod, 0.0), "sigma must be")
    one_line_error(lambda: diffusion_timestep(model.alphas_cumprod, float("nan")), "sigma must be")
    one_line_error(lambda: DiffusionDenoiser(model, 0.25, steps=0), "steps must be")
    t = model.timestep(0.25)
    one_line_error(lambda: DiffusionDenoiser(model, 0.25, steps=t + 2), f"exceeds the {t + 1} timesteps")


def _independent_x0(unet: nn.Module, x_t: torch.Tensor, t: int) -> torch.Tensor:
    abar = float(ddpm_scheduler().alphas_cumprod.double()[t])
    eps = unet(x_t, torch.tensor([t] * len(x_t))).sample
    return ((x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)


def test_one_shot_matches_independent_computation(model):
    torch.manual_seed(1)
    sigma = 0.25
    x = torch.rand(3, 1, 8, 8)
    noisy = x + sigma * torch.randn_like(x)
    with torch.no_grad():
        out = DiffusionDenoiser(model, sigma)(noisy)
        t = model.timestep(sigma)
        abar = float(ddpm_scheduler().alphas_cumprod.double()[t])
        x_t = math.sqrt(abar) * (2 * noisy - 1)
        expected = (_independent_x0(tiny_unet(), x_t, t) + 1) / 2
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.min() >= 0 and out.max() <= 1


def test_multi_step_is_deterministic_ddim(model):
    torch.manual_seed(2)
    sigma = 0.5
    noisy = torch.rand(2, 1, 8, 8) + sigma * torch.randn(2, 1, 8, 8)
    t_star = model.timestep(sigma)
    assert ddim_timesteps(t_star, 1) == [t_star]
    assert ddim_timesteps(t_star, 3) == [t_star, round(t_star / 2), 0]
    with torch.no_grad():
        one = DiffusionDenoiser(model, sigma, steps=1)(noisy)
        torch.testing.assert_close(one, DiffusionDenoiser(model, sigma)(noisy))
        out = DiffusionDenoiser(model, sigma, steps=3)(noisy)
        again = DiffusionDenoiser(model, sigma, steps=3)(noisy)
        abar = ddpm_scheduler().alphas_cumprod.double()
        unet = tiny_unet()
        x_t = math.sqrt(float(abar[t_star])) * (2 * noisy - 1)
        times = [t_star, round(t_star / 2), 0]
        for i, t in enumerate(times):
            x0 = _independent_x0(unet, x_t, t)
            eps = (x_t - math.sqrt(float(abar[t])) * x0) / math.sqrt(1 - float(abar[t]))
            if i + 1 < len(times):
                nxt = float(abar[times[i + 1]])
                x_t = math.sqrt(nxt) * x0 + math.sqrt(1 - nxt) * eps
    assert torch.equal(out, again)
    torch.testing.assert_close(out, (x0 + 1) / 2, atol=1e-5, rtol=1e-5)


class _Config(dict):
    __getattr__ = dict.__getitem__


class _ConstantUNet(nn.Module):
    """A stand-in UNet predicting the same value everywhere."""

    def __init__(self, value: float, channels: int = 1, size: int = 8) -> None:
        super().__init__()
        self.value = value
        self.config = _Config(sample_size=size, in_channels=channels, out_channels=channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=torch.full_like(x, self.value))


def test_clipping():
    noisy = torch.linspace(-0.5, 1.5, 64).reshape(1, 1, 8, 8)
    scheduler = ddpm_scheduler()
    # eps = 0: x0^ = x_t / sqrt(abar) = 2 y - 1, so the output is y clipped to [0, 1]
    out = DiffusionDenoiser(DiffusionModel(_ConstantUNet(0.0), scheduler), 0.25)(noisy)
    assert torch.allclose(out, noisy.clamp(0, 1), atol=1e-6)
    assert out.min() == 0 and out.max() == 1
    high = DiffusionDenoiser(DiffusionModel(_ConstantUNet(-100.0), scheduler), 0.25)(noisy)
    low = DiffusionDenoiser(DiffusionModel(_ConstantUNet(100.0), scheduler), 0.25)(noisy)
    assert torch.equal(high, torch.ones_like(noisy)) and torch.equal(low, torch.zeros_like(noisy))


def test_v_and_sample_prediction():
    noisy = torch.rand(1, 1, 8, 8)
    for kind, value in (("v_prediction", 0.3), ("sample", 0.3)):
        scheduler = ddpm_scheduler(prediction_type=kind)
        denoiser = DiffusionDenoiser(DiffusionModel(_ConstantUNet(value), scheduler), 0.25)
        abar = float(scheduler.alphas_cumprod.double()[denoiser.t_star])
        x_t = math.sqrt(abar) * (2 * noisy - 1)
        if kind == "v_prediction":
            x0 = math.sqrt(abar) * x_t - math.sqrt(1 - abar) * value
        else:
            x0 = torch.full_like(x_t, value)
        torch.testing.assert_close(denoiser(noisy), (x0.clamp(-1, 1) + 1) / 2)


def test_shape_mismatch(model):
    denoiser = DiffusionDenoiser(model, 0.25)
    one_line_error(lambda: denoiser(torch.rand(2, 3, 8, 8)), "takes batches of 1x8x8 images, got 3x8x8")
    one_line_error(lambda: denoiser(torch.rand(2, 1, 28, 28)), "got 1x28x28")
    one_line_error(lambda: denoiser(torch.rand(1, 8, 8)), "a 3-d tensor")


@pytest.mark.parametrize("steps", [1, 3])
def test_chunked_unet_gives_the_whole_batch_result(model, steps):
    """chunk = K: the UNet sees at most K images per call (7 = 3 + 3 + 1), the output and the input's
    gradient are the whole batch's; chunk >= batch is one call; a bad chunk is refused in one line."""
    torch.manual_seed(3)
    noisy = (torch.rand(7, 1, 8, 8) + 0.25 * torch.randn(7, 1, 8, 8)).requires_grad_()
    whole = DiffusionDenoiser(model, 0.25, steps=steps)
    chunked = DiffusionDenoiser(model, 0.25, steps=steps, chunk=3)
    seen: list[int] = []
    hook = model.unet.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[0]))
    try:
        out = chunked(noisy)
        assert seen == [3] * steps + [3] * steps + [1] * steps  # each chunk through the whole chain
        expected = whole(noisy)
        seen.clear()
        DiffusionDenoiser(model, 0.25, steps=steps, chunk=7)(noisy)
        assert seen == [7] * steps
    finally:
        hook.remove()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    weights = torch.randn_like(out)
    (grad_chunked,) = torch.autograd.grad((out * weights).sum(), noisy)
    (grad_whole,) = torch.autograd.grad((expected * weights).sum(), noisy)
    torch.testing.assert_close(grad_chunked, grad_whole, atol=1e-5, rtol=1e-5)
    for bad in (0, -2, 2.0, True):
        one_line_error(lambda bad=bad: DiffusionDenoiser(model, 0.25, chunk=bad), "chunk must be an integer >= 1")


def test_loader_chunks_on_cpu_only(pipeline_dir):
    denoiser, _ = diffusion_denoiser(pipeline_dir, sigma=0.25, shape=(1, 8, 8), device="cpu")
    assert denoiser.chunk == CPU_CHUNK == 64


def test_class_conditional_refused():
    unet = _ConstantUNet(0.0)
    unet.config["class_embed_type"] = "timestep"
    one_line_error(lambda: DiffusionModel(unet, ddpm_scheduler()), "class-conditional")


# ------------------------------------------------------------------ training


def test_train_resume_is_exact(tmp_path):
    whole = tmp_path / "whole"
    train_ddpm(ddpm_train_settings(whole))
    parts = tmp_path / "parts"
    train_ddpm(ddpm_train_settings(parts, max_steps=4))  # killed mid-epoch 2 (3 steps per epoch)
    assert ddpm_checkpoint(parts)["step"] == 4 and ddpm_checkpoint(parts)["batch_in_epoch"] == 1
    one_line_error(lambda: train_ddpm(ddpm_train_settings(parts)), "already holds a training run", "--resume")
    one_line_error(lambda: train_ddpm(ddpm_train_settings(parts, resume=True, lr=1e-3)), "cannot resume", "--lr")
    train_ddpm(ddpm_train_settings(parts, resume=True))
    a, b = ddpm_checkpoint(whole), ddpm_checkpoint(parts)
    assert a["step"] == b["step"] == 6
    for key in ("unet", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])
    for s1, s2 in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(a["rng"]["noise"], b["rng"]["noise"])
    weights = "model/unet/diffusion_pytorch_model.safetensors"
    assert (whole / weights).read_bytes() == (parts / weights).read_bytes()

    def rows(path: Path) -> list[list[str]]:  # all but the clock columns
        return [line.split("\t")[:5] for line in (path / "log.tsv").read_text().splitlines()]

    assert rows(whole) == rows(parts)
    assert [r[0] for r in rows(whole)[1:]] == ["step", "epoch", "step", "step", "epoch"]
    # the EMA model of the last epoch loads and denoises
    trained = load_diffusion(whole / "model")
    assert trained.shape == (3, 8, 8)
    assert json.loads((whole / "model" / "training.json").read_text())["epoch"] == 2
    with torch.no_grad():
        out = DiffusionDenoiser(trained, 0.25)(torch.rand(2, 3, 8, 8))
    assert out.shape == (2, 3, 8, 8) and out.min() >= 0 and out.max() <= 1


def test_model_written_on_resume_after_a_kill_at_epoch_end(tmp_path):
    """Killed between an epoch's checkpoint and its model directory: the resumed run writes that epoch's model."""
    train_ddpm(ddpm_train_settings(tmp_path, epochs=1, max_steps=2))  # a checkpoint at step 2 and no model yet
    assert not (tmp_path / "model").exists()
    train_ddpm(ddpm_train_settings(tmp_path, epochs=1, resume=True))
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert (record["epoch"], record["step"]) == (1, 3)
    (tmp_path / "model" / "training.json").write_text(json.dumps({**record, "step": 0}))  # an older epoch's model
    # nothing left to train: only the model is rewritten
    train_ddpm(ddpm_train_settings(tmp_path, epochs=1, resume=True))
    assert json.loads((tmp_path / "model" / "training.json").read_text())["step"] == 3


