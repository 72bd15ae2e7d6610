"""Lesion study (jaxres.analysis.lesion) against lesions done by hand with the unit interface.

A lesioned ReLU unit of either twin computes its input unchanged (a residual unit keeps
relu(h + 0) = h, its input being a ReLU output; a plain unit becomes the identity), so by hand
the lesioned net is `model.apply` up to the unit before it, then from the unit after it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.analysis import lesion
from jaxres.analysis.segments import SegmentCache
from jaxres.models import ResNet


@pytest.fixture(scope="module", params=[True, False], ids=["residual", "plain"])
def twin(request):
    """A 2-stage CIFAR-style net, 2 shape-keeping units then a downsampling one; 6x6 inputs."""
    model = ResNet(stage_sizes=(2, 1), widths=(4, 6), stem="cifar", shortcut="A", num_classes=5,
                   residual=request.param)
    x = jax.random.normal(jax.random.key(0), (7, 6, 6, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    # running statistics that are not the identity, so bn="eval" is a real test
    variables = {**variables, "batch_stats": jax.tree.map(
        lambda s: s + 0.3 * jax.random.uniform(jax.random.key(2), s.shape), variables["batch_stats"])}
    labels = np.array([0, 1, 2, 3, 4, 0, 1])
    return model, variables, np.asarray(x), labels


def by_hand(model, variables, x, skipped: set[str]):
    """Logits of the net with the units in `skipped` passed over (eval mode)."""
    h = jnp.asarray(x)
    for name in model.unit_names():
        if name not in skipped:
            h = model.apply(variables, h, False, start=name, stop=name)
    return np.asarray(h)


def test_units_that_keep_their_shape_are_lesioned_the_way_their_twin_allows(twin):
    model, variables, x, labels = twin
    result = lesion.lesion_study(model, variables, x, labels, ks=(1,), draws=1)
    how = lesion.SHORTCUT if model.residual else lesion.IDENTITY
    assert result["kinds"] == {"unit_1": how, "unit_2": how}
    assert set(result["refused"]) == {"stem", "unit_3", "head"}


@pytest.mark.parametrize("removed", [{"unit_1"}, {"unit_2"}, {"unit_1", "unit_2"}])
def test_lesioned_logits_equal_the_net_with_the_units_skipped_by_hand(twin, removed):
    model, variables, x, _ = twin
    segments = SegmentCache().segments(model, variables, x.shape, "eval")
    kinds, _ = lesion.classify_units(segments, jnp.asarray(x))
    logits = lesion.lesioned_logits(segments, kinds, lesion.unit_inputs(segments, jnp.asarray(x)), frozenset(removed))
    np.testing.assert_allclose(np.asarray(logits), by_hand(model, variables, x, removed), rtol=1e-5, atol=1e-6)


def test_errors_are_exact_counts_of_mistakes_with_a_wilson_interval(twin):
    model, variables, x, labels = twin
    # batch 3 over 7 images: the last batch is padded, and its padding must not count
    result = lesion.lesion_study(model, variables, x, labels, ks=(2,), draws=2, batch_size=3)
    for removed, entry in [(set(), result["baseline"]), ({"unit_2"}, result["single"]["unit_2"])]:
        wrong = int(np.sum(np.argmax(by_hand(model, variables, x, removed), -1) != labels))
        assert entry["mistakes"] == wrong
        assert entry["estimate"] == wrong / 7
        assert entry["ci_low"] <= entry["estimate"] <= entry["ci_high"]
    (both,) = result["random"]
    assert both["sets"] == [["unit_1", "unit_2"]] * 2  # the only 2 of 2
    wrong = int(np.sum(np.argmax(by_hand(model, variables, x, {"unit_1", "unit_2"}), -1) != labels))
    assert both["errors"] == [wrong / 7] * 2


def test_a_unit_that_changes_shape_is_refused_with_the_units_that_can_be(twin):
    model, variables, x, labels = twin
    with pytest.raises(ValueError, match=r"cannot lesion unit_3: it changes the shape of its input "
                                         r"\(6x6x4 -> 3x3x6\).*can be lesioned: unit_1, unit_2"):
        lesion.lesion_study(model, variables, x, labels, units=["unit_3"])


@pytest.mark.parametrize("kwargs, message", [
    ({"units": ["unit_9"]}, "unknown unit 'unit_9'"),
    ({"ks": (3,)}, r"must lie in 1\.\.2"),
    ({"draws": 0}, "draws must be a positive integer"),
    ({"bn": "train"}, "BatchNorm policy"),
])
def test_bad_arguments_are_refused_before_any_evaluation(twin, kwargs, message):
    model, variables, x, labels = twin
    with pytest.raises(ValueError, match=message):
        lesion.lesion_study(model, variables, x, labels, **kwargs)
