"""`train`: one sigma, the optimizer setting, and batching helpers in `data`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smoothadv import data, train
from smoothadv.errors import SmoothAdvError
from smoothadv.objectives import GaussianAugmentation
from smoothadv.settings import TrainSettings


def test_fit_refuses_an_objective_of_another_sigma_before_writing_anything(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = TrainSettings(dataset="synthetic", arch="toy_cnn", out_dir=out, sigma=0.25, epochs=1, progress=False)
    with pytest.raises(SmoothAdvError, match="sigma 1 but the settings say --sigma 0.25") as info:
        train.fit(cfg, GaussianAugmentation(1.0))
    assert "\n" not in str(info.value) and not out.exists()


def test_the_optimizer_is_a_setting_of_the_loop() -> None:
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    cfg = TrainSettings(dataset="synthetic", arch="toy_cnn", out_dir=Path("run"), lr=0.5, weight_decay=0.0)
    sgd = train.make_optimizer(cfg, parameters)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    adam = train.make_optimizer(TrainSettings(dataset="synthetic", arch="toy_cnn", out_dir=Path("run"),
                                              optimizer="adam"), parameters)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["weight_decay"] == 1e-4


def test_batching_lives_in_data_and_train_reexports_it() -> None:
    assert train.batches is data.batches and train.num_batches is data.num_batches
    dataset = data.make_synthetic("test", size=10)
    assert len(data.subset(dataset, 4)) == 4 and data.subset(dataset, None) is dataset
    with pytest.raises(SmoothAdvError, match="subset size must be >= 1"):
        data.subset(dataset, 0)
    sizes = [len(y) for _, y in data.batches(dataset, 4, shuffle=False)]
    assert sizes == [4, 4, 2] and data.num_batches(dataset, 4) == 3
