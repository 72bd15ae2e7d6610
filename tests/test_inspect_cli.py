"""`jaxres inspect` on a weights file that records its training config: a tiny ResNet on the
built-in synthetic dataset (no files to prepare). What it writes, and the bad inputs it refuses
before any work, each with exit status 2 and one line naming the fix."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.cli import main
from jaxres.configs.base import base_config
from jaxres.train import config as config_lib
from jaxres.train.run import build_model
from jaxres.weights.io import save_weights

OVERRIDES = {"stage_sizes": [2, 1], "widths": [4, 6], "stem": "cifar", "shortcut": "A"}


def tiny_config(**fields) -> dict:
    config = base_config()
    config.model, config.dataset, config.analysis_batch_size = "ResNet", "synthetic", 8
    config.model_overrides = OVERRIDES
    config.num_steps, config.lr_boundaries = 10, {"5": 0.1}
    for k, v in fields.items():
        setattr(config, k, v)
    return config_lib.to_json(config)


def write_weights(path, scale: float = 1.0) -> str:
    config = tiny_config()
    from jaxres.data import dataset_spec

    model = build_model(config_lib.from_json(config), dataset_spec("synthetic"))
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), False))(jax.random.key(3))
    variables = jax.tree.map(lambda a: np.asarray(a) * scale, variables)
    save_weights(path, variables, "ResNet", num_classes=10, config=config)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors")


def test_lesion_writes_exact_errors_with_intervals(weights, tmp_path, capsys):
    assert main(["inspect", "lesion", "--checkpoint", weights, "--images", "20", "--batch-size", "10",
                 "--ks", "1,2", "--draws", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "lesion.json").read_text())
    assert result["units"] == ["unit_1", "unit_2"] and result["num_images"] == 20
    assert result["baseline"]["ci_low"] <= result["baseline"]["estimate"] <= result["baseline"]["ci_high"]
    assert result["wall_time_s"] > 0 and len(result["load_average"]) == 3
    assert "Wilson" in capsys.readouterr().out


def test_sharpness_of_the_trained_weights_and_the_initialization(weights, tmp_path):
    assert main(["inspect", "sharpness", "--checkpoint", weights, "--init", "--max-iter", "30", "--tol", "1e-2",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sharpness.json").read_text())
    assert result["trained"]["learning_rate"] == pytest.approx(0.01)  # after the boundary at step 5
    assert result["initialization"]["learning_rate"] == pytest.approx(0.1)
    assert result["trained"]["lambda_max"] > 0 and result["trained"]["bn"] == "batch"


def test_a_trained_net_loads_from_python_as_the_cli_loads_it(weights):
    from jaxres.train.trained_net import TrainedNet

    net = TrainedNet(weights)
    assert net.config.model == "ResNet" and net.step == 10  # the weights file's config: num_steps
    images, labels = net.images("eval", 4)
    assert images.shape == (4, 32, 32, 3) and labels.shape == (4,)
    assert net.learning_rate(net.step) == pytest.approx(0.01)


def fails(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["landscape", "--grid=-1:1:0"], "--grid '-1:1:0' has 0 points; a slice needs at least 2 per axis"),
    (["lesion", "--units", "unit_3", "--images", "10"], "cannot lesion unit_3: it changes the shape of its input"),
    (["sharpness", "--tol", "2"], "Lanczos tolerance must be a relative residual in (0, 1)"),
    (["lesion", "--bn", "running"], "unknown BatchNorm policy (bn) 'running'"),
])
def test_bad_arguments_are_refused(weights, tmp_path, capsys, argv, message):
    err = fails(["inspect", argv[0], "--checkpoint", weights, "--out", str(tmp_path), *argv[1:]], capsys)
    assert message in err
    assert not list(tmp_path.iterdir())


def test_a_landscape_of_a_net_without_a_checkpoint_is_refused(tmp_path, capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    err = fails(["inspect", "landscape", "--checkpoint", str(workdir), "--out", str(tmp_path / "out")], capsys)
    assert "holds no checkpoint" in err


def test_a_diverged_net_gets_no_hessian(tmp_path, capsys):
    nan_weights = write_weights(tmp_path / "nan.safetensors", scale=np.nan)
    err = fails(["inspect", "sharpness", "--checkpoint", nan_weights, "--out", str(tmp_path / "out")], capsys)
    assert "non-finite values (NaN or inf)" in err and "the run diverged" in err
