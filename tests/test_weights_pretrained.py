"""`jaxres.pretrained(name, weights)` -> (model, variables): weight specs, torchvision's cache,
the offline error, other num_classes, and `jaxres convert torchvision`. Never a download:
the network call is replaced by one that fails as offline machines do."""

import json
import pathlib
import sys
import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxres

from jaxres.cli import main
from jaxres.weights import WeightsUnavailableError, pretrained, read_state_dict, read_weights_info, torchvision_weights
from jaxres.weights import loading
from jaxres.weights.loading import fetch_torchvision_file, torchvision_cache_path

SHAPES = json.loads((pathlib.Path(__file__).parent / "data" / "torchvision_state_dict_shapes.json").read_text())


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torchvision cache and a network that fails like a machine without internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, destination, hash_prefix):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(loading, "_download", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def resnet18_safetensors(tmp_path_factory):
    """A torchvision-layout resnet18 state_dict with random values, as safetensors (no torch)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    state_dict = {k: (rng.standard_normal(s, dtype=np.float32) if not k.endswith("num_batches_tracked")
                      else np.array(0, np.int64)) for k, s in SHAPES["resnet18"].items()}
    for k in state_dict:
        if k.endswith("running_var"):
            state_dict[k] = np.abs(state_dict[k]) + 0.5
    path = tmp_path_factory.mktemp("tv") / "resnet18-random.safetensors"
    save_file(state_dict, str(path))
    return path, state_dict


def test_offline_download_names_the_url_and_the_cache_path(offline):
    descriptor = torchvision_weights("resnet50", "IMAGENET1K_V2")
    with pytest.raises(WeightsUnavailableError) as error:
        pretrained("resnet50", "torchvision:IMAGENET1K_V2")
    message = str(error.value)
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert str(offline / "resnet50-11ad3fa6.pth") in message
    assert "jaxres convert torchvision --model resnet50" in message  # the way out
    assert torchvision_cache_path(descriptor) == offline / "resnet50-11ad3fa6.pth"
    assert isinstance(error.value, FileNotFoundError)  # the CLI prints it as one line


def test_no_download_mode_never_touches_the_network(offline):
    with pytest.raises(WeightsUnavailableError, match="is not in torchvision's cache"):
        fetch_torchvision_file(torchvision_weights("vgg16"), download=False)


def test_cli_offline_error_is_one_line_with_exit_code_2(offline, capsys, tmp_path):
    assert main(["convert", "torchvision", "--model", "resnet18", "--weights", "IMAGENET1K_V1",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxres convert: error:") and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in err


def test_bad_specs_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="no 'IMAGENET1K_V3' weights for resnet50; valid: IMAGENET1K_V1, IMAGENET1K_V2"):
        pretrained("resnet50", "torchvision:IMAGENET1K_V3")
    with pytest.raises(FileNotFoundError, match="neither 'torchvision:<TAG>'"):
        pretrained("resnet50", str(tmp_path / "nothing.safetensors"))
    with pytest.raises(TypeError, match="weights must be a spec string or a path, got int"):
        pretrained("resnet50", 3)
    with pytest.raises(ValueError, match="no ImageNet weights for 'cifar_resnet20'"):
        pretrained("cifar_resnet20", "torchvision:DEFAULT")


def test_cli_converts_a_safetensors_state_dict_and_pretrained_loads_it(resnet18_safetensors, tmp_path, capsys):
    source, state_dict = resnet18_safetensors
    out = tmp_path / "weights"
    assert main(["convert", "torchvision", "--from", str(source), "--out", str(out)]) == 0  # model recognized
    printed = capsys.readouterr().out
    assert "resnet18: 11,689,512 parameters" in printed  # torchvision meta num_params
    info = read_weights_info(out / "resnet18.safetensors")
    assert (info.model, info.num_classes) == ("resnet18", 1000)
    model, variables = pretrained("resnet18", out / "resnet18.safetensors")
    np.testing.assert_array_equal(variables["params"]["unit_4"]["conv2"]["kernel"],
                                  state_dict["layer2.1.conv2.weight"].transpose(2, 3, 1, 0))
    # a second conversion never replaces the file silently
    assert main(["convert", "torchvision", "--from", str(source), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err

    # the converted file and the torchvision file give the same model function
    direct_model, direct = pretrained("resnet18", source)
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    np.testing.assert_array_equal(model.apply(variables, x), direct_model.apply(direct, x))


def test_other_num_classes_reinitializes_only_the_last_layer(resnet18_safetensors, tmp_path):
    source, state_dict = resnet18_safetensors
    jaxres_file = tmp_path / "r18.safetensors"
    assert main(["convert", "torchvision", "--model", "resnet18", "--from", str(source), "--out", str(jaxres_file)]) == 0
    for weights in (source, jaxres_file):
        with pytest.warns(UserWarning, match="classif.* 1000 classes, the model 10; .*last linear layer"):
            model, variables = pretrained("resnet18", weights, num_classes=10)
        assert model.num_classes == 10
        assert variables["params"]["head"]["fc"]["kernel"].shape == (512, 10)
        np.testing.assert_array_equal(variables["batch_stats"]["unit_2"]["norm1"]["var"],
                                      state_dict["layer1.1.bn1.running_var"])
    with pytest.raises(ValueError, match="holds resnet18 weights, not resnet34"):
        pretrained("resnet34", jaxres_file)


def test_overrides_reach_the_model(resnet18_safetensors):
    source, _ = resnet18_safetensors
    model, variables = pretrained("resnet18", source, param_dtype=jnp.bfloat16)
    assert model.param_dtype == jnp.bfloat16
    assert variables["params"]["stem"]["conv1"]["kernel"].dtype == jnp.bfloat16


def test_without_torch_the_torchvision_path_says_to_install_it(offline, monkeypatch, tmp_path):
    for module in ("torch", "torch.hub"):
        monkeypatch.setitem(sys.modules, module, None)  # `import torch` now fails as if not installed
    with pytest.raises(WeightsUnavailableError, match=r"needs torch \(pip install 'jaxres\[torch\]'\)") as error:
        pretrained("resnet18", "torchvision:IMAGENET1K_V1")
    # the cache path is computed as torch.hub.get_dir() would: $TORCH_HOME/hub/checkpoints
    assert str(offline / "resnet18-f37072fd.pth") in str(error.value)
    (tmp_path / "w.pth").write_bytes(b"not read")
    with pytest.raises(ImportError, match="needs torch .* or save the state_dict with safetensors"):
        read_state_dict(tmp_path / "w.pth")


@pytest.mark.torch
def test_torchvision_spec_uses_torchvisions_cache(offline):
    """The file torchvision's own `resnet18(weights=IMAGENET1K_V1)` would load, at the path
    torchvision uses, gives torchvision's logits (random weights stand in for the real file)."""
    torch = pytest.importorskip("torch", reason="reading torchvision's .pth needs torch")
    torchvision = pytest.importorskip("torchvision", reason="the reference model needs torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    offline.mkdir(parents=True)
    torch.save(reference.state_dict(), offline / "resnet18-f37072fd.pth")
    model, variables = pretrained("resnet18", "torchvision:IMAGENET1K_V1", download=False)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    logits = model.apply(variables, x.transpose(0, 2, 3, 1))
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.torch
def test_cli_converts_a_pth_and_verifies_against_torchvision(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="reading .pth files needs torch")
    torchvision = pytest.importorskip("torchvision", reason="--verify needs torchvision")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18-f37072fd.pth")
    assert main(["convert", "torchvision", "--model", "resnet18", "--from", str(tmp_path / "resnet18-f37072fd.pth"),
                 "--out", str(tmp_path / "out"), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "published ImageNet-1K top-1 69.758%" in printed  # recognized by its file name
    difference = float(printed.split("max |logit difference| ")[1].split()[0])
    assert difference < 1e-4
    info = read_weights_info(tmp_path / "out" / "resnet18.safetensors")
    assert info.preprocessing["resize_size"] == 256 and "IMAGENET1K_V1" in info.source


def test_create_model_with_weights_returns_model_and_variables(resnet18_safetensors):
    source, state_dict = resnet18_safetensors
    model, variables = jaxres.create_model("resnet18", weights=source)
    assert model.unit_names()[-1] == "head"
    np.testing.assert_array_equal(variables["params"]["head"]["fc"]["bias"], state_dict["fc.bias"])
