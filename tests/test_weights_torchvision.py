"""The torchvision conversion table, checked without torch: names and shapes of every
architecture (tests/data/torchvision_state_dict_shapes.json, dumped from torchvision 0.29's
`model.state_dict()` and re-checked against the installed torchvision below), the layout
transforms element by element, and the all-at-once error report."""

import json
import pathlib
import warnings

import numpy as np
import pytest

import jaxres
from jaxres.models import VGG
from jaxres.weights import ConversionError, from_torchvision, identify
from jaxres.weights.state_dict import read_state_dict, state_dict_num_classes, unwrap_state_dict
from jaxres.weights.torchvision import convertible_models, plan_conversion, transpose_2d

SHAPES = json.loads((pathlib.Path(__file__).parent / "data" / "torchvision_state_dict_shapes.json").read_text())


def random_state_dict(shapes: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32) if k.split(".")[-1] != "num_batches_tracked"
            else np.array(7, np.int64) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def resnet18():
    state_dict = random_state_dict(SHAPES["resnet18"])
    return state_dict, from_torchvision(state_dict, "resnet18")


@pytest.mark.parametrize("name", convertible_models())
def test_every_tensor_of_every_architecture_has_one_place(name):
    """Each torchvision tensor maps to one distinct jaxres variable, and they cover the model."""
    plan = plan_conversion(SHAPES[name], name)
    targets = [step.flax_key for step in plan.steps.values()]
    assert len(set(targets)) == len(targets)
    dropped = [k for k in SHAPES[name] if k not in plan.steps]
    assert all(k.endswith("num_batches_tracked") for k in dropped)
    # torchvision meta num_params counts weights and biases, not BN running statistics
    n_params = sum(int(np.prod(step.shape)) for step in plan.steps.values() if step.flax_key[0] == "params")
    assert n_params == jaxres.weights.torchvision_weights(name).num_params
    assert identify(SHAPES[name]) == name
    assert state_dict_num_classes(SHAPES[name]) == 1000


def test_conv_kernels_become_hwio(resnet18):
    state_dict, variables = resnet18
    w = state_dict["layer2.0.conv1.weight"]  # (O, I, H, W) = (128, 64, 3, 3); layer2.0 is unit_3
    kernel = np.asarray(variables["params"]["unit_3"]["conv1"]["kernel"])
    assert kernel.shape == (3, 3, 64, 128)
    assert kernel[2, 0, 5, 7] == w[7, 5, 2, 0]
    np.testing.assert_array_equal(kernel, w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["unit_3"]["proj_conv"]["kernel"]),
        state_dict["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )


def test_batchnorm_parameters_and_running_statistics(resnet18):
    state_dict, variables = resnet18
    for torch_name, unit, layer in [("bn1", "stem", "norm1"), ("layer4.1.bn2", "unit_8", "norm2"),
                                    ("layer3.0.downsample.1", "unit_5", "proj_norm")]:
        np.testing.assert_array_equal(variables["params"][unit][layer]["scale"], state_dict[f"{torch_name}.weight"])
        np.testing.assert_array_equal(variables["params"][unit][layer]["bias"], state_dict[f"{torch_name}.bias"])
        np.testing.assert_array_equal(variables["batch_stats"][unit][layer]["mean"], state_dict[f"{torch_name}.running_mean"])
        np.testing.assert_array_equal(variables["batch_stats"][unit][layer]["var"], state_dict[f"{torch_name}.running_var"])


def test_linear_is_transposed(resnet18):
    state_dict, variables = resnet18
    np.testing.assert_array_equal(variables["params"]["head"]["fc"]["kernel"], state_dict["fc.weight"].T)
    np.testing.assert_array_equal(variables["params"]["head"]["fc"]["bias"], state_dict["fc.bias"])


def test_vgg_first_linear_layer_reads_the_nhwc_flatten():
    """torch's classifier[0] reads x.flatten() of an NCHW map, jaxres's fc1 the NHWC map: the
    same features must give the same outputs (reference: a plain numpy matmul)."""
    model = VGG(layers=(8, "M", 16, "M"), norm="batchnorm", classifier_widths=(32,), num_classes=10)
    rng = np.random.default_rng(0)
    shapes = {  # torchvision's naming: features = [conv, bn, relu, pool] * 2, classifier = [linear, relu, dropout, linear]
        "features.0.weight": (8, 3, 3, 3), "features.0.bias": (8,),
        "features.1.weight": (8,), "features.1.bias": (8,), "features.1.running_mean": (8,), "features.1.running_var": (8,),
        "features.4.weight": (16, 8, 3, 3), "features.4.bias": (16,),
        "features.5.weight": (16,), "features.5.bias": (16,), "features.5.running_mean": (16,), "features.5.running_var": (16,),
        "classifier.0.weight": (32, 16 * 7 * 7), "classifier.0.bias": (32,),
        "classifier.3.weight": (10, 32), "classifier.3.bias": (10,),
    }
    state_dict = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    variables = from_torchvision(state_dict, model)
    features_nchw = rng.standard_normal((16, 7, 7)).astype(np.float32)
    torch_out = state_dict["classifier.0.weight"] @ features_nchw.reshape(-1)
    jaxres_out = features_nchw.transpose(1, 2, 0).reshape(-1) @ np.asarray(variables["params"]["head"]["fc1"]["kernel"])
    np.testing.assert_allclose(jaxres_out, torch_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(variables["params"]["unit_1"]["conv"]["kernel"],
                                  state_dict["features.4.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["unit_1"]["norm"]["var"], state_dict["features.5.running_var"])


def test_blocked_transpose_equals_numpy():
    a = np.random.default_rng(0).standard_normal((700, 1100)).astype(np.float32)
    np.testing.assert_array_equal(transpose_2d(a, block=256), a.T)


def test_every_problem_is_reported_at_once():
    shapes = dict(SHAPES["resnet18"])
    del shapes["layer1.0.conv2.weight"]  # missing
    shapes["layer1.7.conv1.weight"] = [64, 64, 3, 3]  # unexpected: resnet18's layer1 has 2 blocks
    shapes["layer2.0.bn1.weight"] = [100]  # wrong shape
    with pytest.raises(ConversionError) as error:
        plan_conversion(shapes, "resnet18")
    message = str(error.value)
    assert "does not fit resnet18 (1 missing, 1 unexpected, 1 wrong shape); nothing was converted" in message
    assert "params/unit_1/conv2/kernel" in message
    assert "layer1.7.conv1.weight: the model has no layer1.7 (its stages have 2, 2, 2, 2 blocks)" in message
    assert "layer2.0.bn1.weight is (100,), params/unit_3/norm1/scale needs (128,)" in message


def test_another_architecture_is_named_in_the_error():
    with pytest.raises(ConversionError, match="looks like torchvision's resnet50: convert it as model='resnet50'"):
        plan_conversion(SHAPES["resnet50"], "resnet18")
    with pytest.raises(ConversionError, match="looks like torchvision's vgg16_bn"):
        plan_conversion(SHAPES["vgg16_bn"], "vgg16")


def test_models_without_a_torchvision_twin_are_refused():
    for name in ("preact_resnet18", "cifar_resnet20"):
        with pytest.raises(ValueError, match="torchvision has no counterpart of this ResNet"):
            plan_conversion(SHAPES["resnet18"], name)


def test_other_num_classes_keeps_the_backbone_and_reinitializes_the_last_layer(resnet18):
    state_dict, variables = resnet18
    with pytest.warns(UserWarning, match=r"1000 classes, the model 10; .* last linear layer head/fc, which is freshly"):
        ten = from_torchvision(state_dict, "resnet18", num_classes=10)
    assert ten["params"]["head"]["fc"]["kernel"].shape == (512, 10)
    assert ten["params"]["head"]["fc"]["bias"].shape == (10,)
    np.testing.assert_array_equal(ten["params"]["unit_8"]["conv2"]["kernel"], variables["params"]["unit_8"]["conv2"]["kernel"])
    # a fine-tuned 10-class state_dict loads into a 10-class model with no warning
    state_dict_10 = {**state_dict, "fc.weight": state_dict["fc.weight"][:10], "fc.bias": state_dict["fc.bias"][:10]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = from_torchvision(state_dict_10, "resnet18", num_classes=10)
    np.testing.assert_array_equal(exact["params"]["head"]["fc"]["kernel"], state_dict["fc.weight"][:10].T)


def test_training_checkpoints_and_ddp_prefixes_are_unwrapped():
    state_dict = {"module.fc.weight": np.zeros((2, 3))}
    assert list(unwrap_state_dict({"model": state_dict, "epoch": 3})) == ["fc.weight"]
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        unwrap_state_dict([1, 2])


def test_safetensors_state_dict_converts_without_torch(tmp_path, resnet18):
    from safetensors.numpy import save_file

    state_dict, variables = resnet18
    path = tmp_path / "resnet18.safetensors"
    save_file(state_dict, str(path))
    loaded = read_state_dict(path)
    assert set(loaded) == set(state_dict)
    again = from_torchvision(loaded, "resnet18")
    np.testing.assert_array_equal(again["params"]["unit_5"]["conv1"]["kernel"], variables["params"]["unit_5"]["conv1"]["kernel"])


def test_unreadable_sources_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        read_state_dict(tmp_path / "absent.pth")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match=r"expected \.pth, \.pt, \.bin or \.safetensors"):
        read_state_dict(tmp_path / "weights.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "broken.safetensors")
    with pytest.raises(TypeError, match="must be torch tensors or arrays, got str"):
        from_torchvision({"fc.weight": "abc"}, "resnet18")


@pytest.mark.torch
def test_shapes_file_equals_installed_torchvision():
    torch = pytest.importorskip("torch", reason="comparing with torchvision needs torch")
    torchvision = pytest.importorskip("torchvision", reason="comparing with torchvision needs torchvision")
    for name in convertible_models():
        with torch.device("meta"):
            model = getattr(torchvision.models, name)(weights=None)
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == SHAPES[name], name


@pytest.mark.torch
def test_pth_file_with_torch_tensors(tmp_path, resnet18):
    torch = pytest.importorskip("torch", reason="reading .pth files needs torch")
    state_dict, variables = resnet18
    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    tensors["fc.weight"] = tensors["fc.weight"].to(torch.bfloat16)  # numpy has no bfloat16
    torch.save(tensors, tmp_path / "r.pth")
    converted = from_torchvision(read_state_dict(tmp_path / "r.pth"), "resnet18")
    np.testing.assert_array_equal(converted["params"]["unit_1"]["conv1"]["kernel"], variables["params"]["unit_1"]["conv1"]["kernel"])
    expected = tensors["fc.weight"].float().numpy().T
    np.testing.assert_array_equal(converted["params"]["head"]["fc"]["kernel"], expected)
