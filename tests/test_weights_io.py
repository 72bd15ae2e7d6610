"""The jaxres weights file (jaxres/weights/io.py): exact round trip, checksum, and every
mismatch of model, shape and dtype named on load. No torch needed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import jaxres
from jaxres.weights import load_weights, read_weights_info, save_weights
from jaxres.weights.descriptors import Preprocessing
from jaxres.weights.io import tensors_sha256
from tests.conftest import init


@pytest.fixture(scope="module")
def resnet20():
    model = jaxres.create_model("cifar_resnet20")
    return model, init(model, jnp.zeros((1, 32, 32, 3)))


@pytest.fixture
def saved(tmp_path, resnet20):
    _, variables = resnet20
    path = save_weights(tmp_path / "w.safetensors", variables, "cifar_resnet20", num_classes=10,
                        source="unit test", preprocessing=Preprocessing(resize_size=36, crop_size=32))
    return path, variables


def test_round_trip_is_exact_and_keeps_the_metadata(saved):
    path, variables = saved
    loaded, info = load_weights(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert (info.model, info.num_classes, info.source) == ("cifar_resnet20", 10, "unit test")
    assert info.preprocessing["resize_size"] == 36 and info.preprocessing["mean"] == [0.485, 0.456, 0.406]
    assert info.format_version == "1" and len(info.sha256) == 64


def test_file_is_plain_safetensors_with_documented_names(saved):
    path, variables = saved
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata()["format"] == "jaxres.weights"
        assert "params/stem/conv1/kernel" in f.keys() and "batch_stats/unit_9/norm2/var" in f.keys()
        np.testing.assert_array_equal(f.get_tensor("params/head/fc/bias"), variables["params"]["head"]["fc"]["bias"])


def test_checksum_catches_a_changed_byte(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # a bit of the last tensor's data, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="(?s)fails its checksum .* damaged or was modified"):
        load_weights(path)


def test_checksum_depends_on_names_dtypes_and_values():
    a = {"x": np.zeros(3, np.float32)}
    assert tensors_sha256(a) != tensors_sha256({"y": np.zeros(3, np.float32)})
    assert tensors_sha256(a) != tensors_sha256({"x": np.zeros(3, np.float16)})
    assert tensors_sha256(a) != tensors_sha256({"x": np.array([0, 0, 1], np.float32)})
    assert tensors_sha256(a) == tensors_sha256({"x": np.zeros(3, np.float32)})


def test_wrong_model_name_is_refused(saved):
    path, _ = saved
    with pytest.raises(ValueError, match="holds cifar_resnet20 weights, not cifar_resnet32"):
        load_weights(path, "cifar_resnet32")


def test_shape_and_dtype_mismatches_are_all_listed(saved):
    path, _ = saved
    with pytest.raises(ValueError, match=r"params/head/fc/kernel has shape \(64, 10\), the model needs \(64, 100\)"):
        load_weights(path, jaxres.create_model("cifar_resnet20", num_classes=100))
    with pytest.raises(ValueError, match=r"(?s)mismatch\(es\).*has dtype float32, the model needs bfloat16.*astype"):
        load_weights(path, jaxres.create_model("cifar_resnet20", param_dtype=jnp.bfloat16))
    with pytest.raises(ValueError, match=r"mismatch\(es\).*\n  missing batch_stats/unit_10/norm1/mean"):
        load_weights(path, jaxres.create_model("cifar_resnet32"))


def test_bfloat16_weights_round_trip(tmp_path):
    model = jaxres.create_model("cifar_resnet20", param_dtype=jnp.bfloat16)
    variables = init(model, jnp.zeros((1, 32, 32, 3)))
    path = save_weights(tmp_path / "bf16.safetensors", variables, "cifar_resnet20", num_classes=10)
    loaded, _ = load_weights(path, model)
    assert loaded["params"]["stem"]["conv1"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded["params"]["stem"]["conv1"]["kernel"], variables["params"]["stem"]["conv1"]["kernel"])


def test_existing_files_are_never_replaced_silently(saved, resnet20):
    path, variables = saved
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        save_weights(path, variables, "cifar_resnet20", num_classes=10)
    assert path.read_bytes() == before
    save_weights(path, variables, "cifar_resnet20", num_classes=10, source="again", overwrite=True)
    assert read_weights_info(path).source == "again"
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"]  # no .partial left


def test_bad_paths_and_foreign_files(tmp_path, resnet20):
    _, variables = resnet20
    with pytest.raises(ValueError, match=r"end in \.safetensors"):
        save_weights(tmp_path / "w.npz", variables, "cifar_resnet20", num_classes=10)
    with pytest.raises(TypeError, match="Flax variables dict with a 'params' collection"):
        save_weights(tmp_path / "w.safetensors", [1], "cifar_resnet20", num_classes=10)
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load_weights(tmp_path / "absent.safetensors")
    from safetensors.numpy import save_file

    save_file({"fc.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "torch.safetensors"))
    with pytest.raises(ValueError, match="(?s)not a jaxres weights file .*`jaxres convert torchvision`"):
        load_weights(tmp_path / "torch.safetensors")


def test_the_training_config_is_recorded_and_read_back_by_the_analysis(tmp_path, resnet20):
    from jaxres.analysis.restore import restore_variables, stored_config

    _, variables = resnet20
    config = {"model": "cifar_resnet20", "seed": 3, "model_overrides": {"zero_init_residual": True}}
    path = save_weights(tmp_path / "t.safetensors", variables, "cifar_resnet20", num_classes=10, config=config)
    assert read_weights_info(path).config == config
    assert stored_config(path) == config
    restored = restore_variables(path)
    np.testing.assert_array_equal(restored["params"]["head"]["fc"]["kernel"], variables["params"]["head"]["fc"]["kernel"])
    plain = save_weights(tmp_path / "p.safetensors", variables, "cifar_resnet20", num_classes=10)
    assert read_weights_info(plain).config is None and stored_config(plain) == {"model": "cifar_resnet20"}


def test_an_edited_config_is_refused(tmp_path, resnet20):
    from safetensors.numpy import load_file, save_file

    _, variables = resnet20
    path = save_weights(tmp_path / "t.safetensors", variables, "cifar_resnet20", num_classes=10, config={"seed": 1})
    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata=dict(metadata, config="[1, 2]"))
    with pytest.raises(ValueError, match="config is not a JSON object; the file was edited"):
        read_weights_info(path)
