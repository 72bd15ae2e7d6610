"""Signal-propagation statistics (Brock et al. 2021 Fig. 1, De & Smith 2020) against facts
the theory fixes at initialization."""

import jax
import numpy as np
import pytest

from jaxres.analysis.signal_prop import plot_signal_propagation, signal_propagation
from jaxres.models import ResNet

X = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))


def _run(**config):
    model = ResNet(stage_sizes=(6,), widths=(32,), stem="cifar", num_classes=10, **config)
    return signal_propagation(model, model.init(jax.random.key(1), X[:1]), X, bn="batch")


@pytest.fixture(scope="module")
def nets():
    return {"plain BN": _run(residual=False), "pre-act BN": _run(preact=True),
            "post-act BN": _run(residual=True)}


def test_plain_bn_relu_outputs_have_the_moments_of_relu_of_a_standard_normal(nets):
    """After BN (train mode) each channel is standardized over N x H x W, so relu(BN(.)) has
    channel mean 1/sqrt(2 pi) (squared: 1 / (2 pi) = 0.159) and variance (pi - 1) / (2 pi) = 0.341."""
    sp = nets["plain BN"]
    np.testing.assert_allclose(sp.mean_sq, 1 / (2 * np.pi), rtol=0.06)
    np.testing.assert_allclose(sp.variance, (np.pi - 1) / (2 * np.pi), rtol=0.06)
    assert not sp.identity_shortcut.any() and np.isnan(sp.branch_skip_ratio).all()


def test_preactivation_bn_stream_grows_linearly_and_branches_shrink_relative_to_it(nets):
    """Each BN-ReLU-conv branch adds a second moment of about one (He fan-out init: 2 x 1/2,
    less the zero-padding borders) to the residual stream: its total second moment
    (squared mean + variance) grows linearly with depth, and the branch / skip variance ratio
    falls (De & Smith 2020: BN biases the blocks towards the identity)."""
    sp = nets["pre-act BN"]
    assert sp.identity_shortcut[1:].all()
    total = (sp.mean_sq + sp.variance)[1:]
    slope, intercept = np.polyfit(np.arange(len(total)), total, 1)
    fit = slope * np.arange(len(total)) + intercept
    assert 1 - np.var(total - fit) / np.var(total) > 0.98
    assert 0.75 < slope < 1.05
    ratio = sp.branch_skip_ratio[1:]
    assert ratio[-1] < 0.5 * ratio[0] and np.all(np.diff(ratio) < 0.05)


def test_plot_writes_a_png(nets, tmp_path):
    path = plot_signal_propagation(nets, tmp_path / "signal.png")
    assert path.exists() and path.stat().st_size > 10_000
