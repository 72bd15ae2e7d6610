"""The pure training pieces: step, loss, optimizer with L2 weight decay, schedules, and the
collectives the multi-device drivers rely on."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxres.models import ResNet
from jaxres.train import (cross_entropy, create_train_state, eval_step, make_optimizer, piecewise_constant,
                          step_decay, train_step, warmup_cosine)
from jaxres.train.optim import decay_mask


@pytest.fixture(scope="module")
def setup():
    model = ResNet(stage_sizes=(1, 1, 1), widths=(4, 8, 16), stem="cifar", shortcut="A", num_classes=10)
    tx = make_optimizer(optax.constant_schedule(0.1), momentum=0.9, weight_decay=1e-4)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, 16, 16, 3))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32),
             "label": jnp.asarray(np.arange(16) % 10, jnp.int32)}
    return state, batch, jax.jit(train_step)


def test_step_decreases_the_loss_on_a_fixed_batch(setup):
    state, batch, step = setup
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8
    assert losses[0] > 2.0  # ~ln 10 = 2.30 at initialization
    assert losses[-1] < 0.8 * losses[0]
    assert set(metrics) == {"loss", "accuracy", "grad_norm"}


def test_step_updates_batchnorm_statistics(setup):
    state, batch, step = setup
    new, _ = step(state, batch)
    # Flax momentum 0.9: running mean = 0.9 * 0 + 0.1 * batch mean, so it moves off zero.
    assert float(jnp.abs(new.batch_stats["stem"]["norm1"]["mean"]).max()) > 0
    assert np.array_equal(state.batch_stats["stem"]["norm1"]["mean"], np.zeros(4))


def test_axis_name_gives_the_full_batch_step_with_synchronized_batchnorm(setup):
    # Two "devices" (vmap with a named axis) each holding half the batch must take exactly
    # the step of one device on the whole batch: pmean'd gradients and BatchNorm statistics
    # synchronized over the axis (mean of the halves' E[x], E[x^2]).
    state, batch, step = setup
    full, full_metrics = step(state, batch)
    halves = jax.tree.map(lambda x: x.reshape(2, 8, *x.shape[1:]), batch)
    sync = jax.jit(jax.vmap(lambda s, b: train_step(s, b, axis_name="devices"), in_axes=(None, 0),
                            axis_name="devices"))
    per_device, metrics = sync(state, halves)
    for a, b in zip(jax.tree.leaves((per_device.params, per_device.batch_stats)),
                    jax.tree.leaves((full.params, full.batch_stats))):
        np.testing.assert_allclose(a[0], b, atol=2e-6)
        np.testing.assert_array_equal(a[0], a[1])  # replicas stay identical
    np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-6)
    # Without the axis each half normalizes with its own statistics: a different step.
    unsynced, _ = jax.jit(jax.vmap(train_step, in_axes=(None, 0)))(state, halves)
    assert not np.allclose(unsynced.params["stem"]["conv1"]["kernel"][0], full.params["stem"]["conv1"]["kernel"],
                           atol=1e-5)


def test_eval_step_counts_only_real_examples(setup):
    state, batch, _ = setup
    mask = jnp.asarray(np.arange(16) < 11, jnp.float32)
    sums = jax.jit(eval_step)(state, dict(batch, mask=mask))
    logits = state.model.apply(state.variables(), batch["image"], False)
    per_example = cross_entropy(logits, batch["label"])
    assert float(sums["count"]) == 11
    np.testing.assert_allclose(sums["loss_sum"], per_example[:11].sum(), rtol=1e-6)
    assert float(sums["correct"]) == float(jnp.sum(jnp.argmax(logits[:11], -1) == batch["label"][:11]))


def test_label_smoothing_matches_the_formula():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    logp = jax.nn.log_softmax(logits)[0]
    # target = (1 - a) onehot + a / K, with a = 0.3, K = 3
    expected = -(0.8 * logp[0] + 0.1 * logp[1] + 0.1 * logp[2])
    np.testing.assert_allclose(cross_entropy(logits, jnp.array([0]), 0.3)[0], expected, rtol=1e-6)


def test_weight_decay_matches_a_hand_computed_update():
    # torch.optim.SGD semantics: d = g + wd * w; m = d + mu * m; w -= lr * m.
    lr, mu, wd = 0.1, 0.9, 1e-4
    w0 = {"conv": {"kernel": jnp.array([1.0, -2.0])}, "norm": {"scale": jnp.array([3.0])}}
    g = {"conv": {"kernel": jnp.array([0.5, 0.25])}, "norm": {"scale": jnp.array([-1.0])}}
    tx = make_optimizer(optax.constant_schedule(lr), momentum=mu, weight_decay=wd)
    opt = tx.init(w0)
    u1, opt = tx.update(g, opt, w0)
    w1 = optax.apply_updates(w0, u1)
    u2, opt = tx.update(g, opt, w1)
    w2 = optax.apply_updates(w1, u2)
    for path in (("conv", "kernel"), ("norm", "scale")):
        w, gg = w0[path[0]][path[1]], g[path[0]][path[1]]
        m1 = gg + wd * w
        h1 = w - lr * m1
        m2 = (gg + wd * h1) + mu * m1
        h2 = h1 - lr * m2
        np.testing.assert_allclose(w1[path[0]][path[1]], h1, rtol=1e-6)
        np.testing.assert_allclose(w2[path[0]][path[1]], h2, rtol=1e-6)


def test_weight_decay_can_exclude_batchnorm_and_bias():
    params = {"conv1": {"kernel": 1.0}, "norm1": {"scale": 1.0, "bias": 1.0}, "fc": {"kernel": 1.0, "bias": 1.0}}
    assert decay_mask(params, True) == {"conv1": {"kernel": True}, "norm1": {"scale": False, "bias": False},
                                        "fc": {"kernel": True, "bias": False}}
    assert all(jax.tree.leaves(decay_mask(params, False)))


def test_cifar_schedule_has_the_papers_values_at_the_boundaries():
    # He et al. 2015 4.2: 0.1, /10 at 32k and 48k iterations (count = iterations done).
    lr = piecewise_constant(0.1, {32000: 0.1, 48000: 0.1})
    values = [float(lr(c)) for c in (0, 31999, 32000, 47999, 48000, 63999)]
    np.testing.assert_allclose(values, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    # ResNet-110: 0.01 until 400 iterations, then 0.1.
    warm = piecewise_constant(0.01, {400: 10.0, 32000: 0.1, 48000: 0.1})
    np.testing.assert_allclose([float(warm(c)) for c in (0, 399, 400, 32000)], [0.01, 0.01, 0.1, 0.01], rtol=1e-6)


def test_imagenet_step_decay_divides_by_ten_every_30_epochs():
    lr = step_decay(0.1, 30 * 5004)  # 5004 iterations per epoch at batch 256
    np.testing.assert_allclose([float(lr(c)) for c in (0, 150119, 150120, 300240)], [0.1, 0.1, 0.01, 0.001],
                               rtol=1e-6)


def test_optax_schedules_equal_the_papers_formulas_at_and_around_every_boundary():
    # Reference: lr(c) = base * prod(scale_b for b <= c), and base * factor ** (c // period),
    # written out here in numpy, independent of optax.
    boundaries = {400: 10.0, 32000: 0.1, 48000: 0.1}
    lr = piecewise_constant(0.01, boundaries)
    counts = [c + d for c in (0, 400, 32000, 48000) for d in (-1, 0, 1) if c + d >= 0] + [64000]
    expected = [0.01 * np.prod([s for b, s in boundaries.items() if b <= c]) for c in counts]
    np.testing.assert_allclose([float(lr(c)) for c in counts], expected, rtol=1e-6)
    decay = step_decay(0.1, 150120, 0.1)
    counts = [c + d for c in (0, 150120, 300240, 450360) for d in (-1, 0, 1) if c + d >= 0]
    np.testing.assert_allclose([float(decay(c)) for c in counts], [0.1 * 0.1 ** (c // 150120) for c in counts],
                               rtol=1e-6)


def test_schedules_refuse_negative_boundaries_and_zero_factors():
    with pytest.raises(ValueError, match="non-negative iterations, got \\[-5, 100\\]"):
        piecewise_constant(0.1, {100: 0.1, -5: 0.1})
    with pytest.raises(ValueError, match="factor must be > 0"):
        step_decay(0.1, 100, 0.0)
    # optax would return NaN at every step, before the boundary too
    with pytest.raises(ValueError, match="scale 1e\\+40 at step 2 \\(learning rate 1e\\+39\\) exceeds float32"):
        piecewise_constant(0.1, {2: 1e40})
    with pytest.raises(ValueError, match="scale 1e\\+39 at step 2 \\(learning rate 1e-05\\) exceeds float32"):
        piecewise_constant(1e-44, {2: 1e39})


def test_warmup_cosine_schedule():
    lr = warmup_cosine(0.4, 100, 1100)
    np.testing.assert_allclose([float(lr(c)) for c in (0, 50, 100, 600, 1100)], [0.0, 0.2, 0.4, 0.2, 0.0],
                               atol=1e-6)
