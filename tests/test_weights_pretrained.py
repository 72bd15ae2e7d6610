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
from jaxres.weights import cache
from jaxres.weights.cache import fetch_torchvision_file, torchvision_cache_path

SHAPES = json.loads((pathlib.Path(__file__).parent / "data" / "torchvision_state_dict_shapes.json").read_text())


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torchvision cache and a network that fails like a machine without internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, destination, hash_prefix):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cache, "_download", no_network)
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


def test_top_level_pretrained_returns_model_and_variables(resnet18_safetensors):
    source, state_dict = resnet18_safetensors
    model, variables = jaxres.pretrained("resnet18", source)
    assert model.unit_names()[-1] == "head"
    np.testing.assert_array_equal(variables["params"]["head"]["fc"]["bias"], state_dict["fc.bias"])


def test_create_model_refuses_weights_and_names_the_entry_point(resnet18_safetensors):
    source, _ = resnet18_safetensors
    with pytest.raises(TypeError, match=r"use model, variables = jaxres.pretrained\('resnet18', "):
        jaxres.create_model("resnet18", weights=str(source))


def test_fine_tuning_warning_points_at_the_callers_line(resnet18_safetensors, tmp_path):
    source, _ = resnet18_safetensors
    jaxres_file = tmp_path / "r18.safetensors"
    assert main(["convert", "torchvision", "--model", "resnet18", "--from", str(source), "--out", str(jaxres_file)]) == 0
    for weights in (source, jaxres_file):
        with pytest.warns(UserWarning, match="freshly initialized") as record:
            jaxres.pretrained("resnet18", weights, num_classes=10)
        assert [w.filename for w in record] == [__file__]  # this line, not jaxres/weights/*.py


def test_list_models_pretrained_keeps_the_names_with_published_weights():
    assert jaxres.list_models("resnet*", pretrained=True) == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert jaxres.list_models("*vgg16*") == ["vgg16", "vgg16_bn", "cifar_vgg16", "cifar_vgg16_bn"]
    assert jaxres.list_models("cifar_resnet", pretrained=True) == []
    assert len(jaxres.list_models(pretrained=True)) == 13  # torchvision: 8 VGGs, 5 ResNets


def test_cli_models_shows_the_published_top1(capsys):
    assert main(["models", "--pretrained", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert len(rows) == 13
    assert (rows["resnet50"]["top1"], rows["resnet50"]["pretrained"]) == (80.858, "torchvision:IMAGENET1K_V2")
    assert rows["vgg16_bn"]["top1"] == 73.360  # torchvision's published IMAGENET1K_V1 accuracy
    assert main(["models", "cifar_resnet20"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[5] == "-"  # no published weights


# --- timm's copies on the Hugging Face Hub ("hf-hub:timm/resnet18.tv_in1k"), never downloaded


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty huggingface_hub cache under a fresh HF_HOME, with the Hub switched off."""
    pytest.importorskip("huggingface_hub", reason="hf-hub: specs read through huggingface_hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home" / "hub"


def put_in_hub_cache(cache: pathlib.Path, repo_id: str, source: pathlib.Path) -> pathlib.Path:
    """Lays out `source` as huggingface_hub's cache holds a downloaded model.safetensors."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    target = folder / "snapshots" / commit / "model.safetensors"
    target.write_bytes(source.read_bytes())
    return target


def test_hub_spec_loads_from_the_cache_without_network(hub_cache, resnet18_safetensors):
    source, state_dict = resnet18_safetensors
    put_in_hub_cache(hub_cache, "timm/resnet18.tv_in1k", source)
    model, variables = jaxres.pretrained("resnet18", "hf-hub:timm/resnet18.tv_in1k")
    assert model.num_classes == 1000
    np.testing.assert_array_equal(variables["params"]["unit_4"]["conv2"]["kernel"],
                                  state_dict["layer2.1.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["unit_2"]["norm1"]["var"],
                                  state_dict["layer1.1.bn1.running_var"])


def test_hub_spec_offline_names_the_repository_cache_path_and_fetch_command(hub_cache):
    with pytest.raises(WeightsUnavailableError) as error:
        jaxres.pretrained("resnet50", "hf-hub:timm/resnet50.tv2_in1k")
    message = str(error.value)
    assert str(hub_cache / "models--timm--resnet50.tv2_in1k" / "snapshots") in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "hf download timm/resnet50.tv2_in1k model.safetensors" in message


def test_hub_spec_with_download_false_never_asks_the_hub(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WeightsUnavailableError, match="is not in the Hub cache .* and download=False"):
        jaxres.pretrained("resnet50", "hf-hub:timm/resnet50.tv2_in1k", download=False)


def test_hub_spec_without_huggingface_hub_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(WeightsUnavailableError, match=r"needs huggingface_hub \(pip install 'jaxres\[hub\]'\)"):
        jaxres.pretrained("resnet50", "hf-hub:timm/resnet50.tv2_in1k")


def test_hub_spec_errors_name_the_fix():
    with pytest.raises(ValueError, match="holds timm's resnet18 weights, not resnet50; load it as 'resnet18'"):
        jaxres.pretrained("resnet50", "hf-hub:timm/resnet18.tv_in1k")
    with pytest.raises(ValueError, match="names no Hub repository: write hf-hub:OWNER/NAME"):
        jaxres.pretrained("resnet50", "hf-hub:resnet50")


def test_cli_converts_a_hub_spec_and_records_the_published_preprocessing(hub_cache, resnet18_safetensors, tmp_path,
                                                                         capsys):
    source, _ = resnet18_safetensors
    put_in_hub_cache(hub_cache, "timm/resnet18.tv_in1k", source)
    assert main(["convert", "torchvision", "--from", "hf-hub:timm/resnet18.tv_in1k", "--out", str(tmp_path)]) == 0
    assert "published ImageNet-1K top-1 69.758%" in capsys.readouterr().out
    info = read_weights_info(tmp_path / "resnet18.safetensors")
    assert info.source == "hf-hub:timm/resnet18.tv_in1k (timm's copy of torchvision torchvision:IMAGENET1K_V1)"
    assert info.preprocessing["resize_size"] == 256


def tiny_vgg_state_dicts():
    """One small VGG's weights in torchvision's layout and in timm's (classifier Linear layers
    held as 7x7 and 1x1 convs, as timm's vgg.py `_filter_fn` reshapes them)."""
    rng = np.random.default_rng(0)
    torchvision_layout = {
        "features.0.weight": rng.standard_normal((8, 3, 3, 3), dtype=np.float32),
        "features.0.bias": rng.standard_normal(8, dtype=np.float32),
        "classifier.0.weight": rng.standard_normal((16, 8 * 7 * 7), dtype=np.float32),
        "classifier.0.bias": rng.standard_normal(16, dtype=np.float32),
        "classifier.3.weight": rng.standard_normal((16, 16), dtype=np.float32),
        "classifier.3.bias": rng.standard_normal(16, dtype=np.float32),
        "classifier.6.weight": rng.standard_normal((5, 16), dtype=np.float32),
        "classifier.6.bias": rng.standard_normal(5, dtype=np.float32),
    }
    timm_layout = {k: v for k, v in torchvision_layout.items() if k.startswith("features.")}
    timm_layout.update({
        "pre_logits.fc1.weight": torchvision_layout["classifier.0.weight"].reshape(16, 8, 7, 7),
        "pre_logits.fc1.bias": torchvision_layout["classifier.0.bias"],
        "pre_logits.fc2.weight": torchvision_layout["classifier.3.weight"].reshape(16, 16, 1, 1),
        "pre_logits.fc2.bias": torchvision_layout["classifier.3.bias"],
        "head.fc.weight": torchvision_layout["classifier.6.weight"],
        "head.fc.bias": torchvision_layout["classifier.6.bias"],
    })
    return torchvision_layout, timm_layout


def test_timm_vgg_layout_converts_like_torchvisions():
    from jaxres.models import VGG
    from jaxres.weights import from_torchvision

    model = VGG(layers=(8, "M"), classifier_widths=(16, 16), num_classes=5)
    torchvision_layout, timm_layout = tiny_vgg_state_dicts()
    expected = from_torchvision(torchvision_layout, model)
    jax.tree.map(np.testing.assert_array_equal, from_torchvision(timm_layout, model), expected)


@pytest.mark.torch
def test_timm_vgg_layout_gives_timms_logits():
    """timm's forward (features -> 7x7 conv fc1 -> ReLU -> 1x1 conv fc2 -> ReLU -> head.fc) on
    the timm-layout weights equals the converted jaxres model: the reshape is read as timm means it."""
    torch = pytest.importorskip("torch", reason="the reference forward runs in torch")
    from jaxres.models import VGG
    from jaxres.weights import from_torchvision

    _, timm_layout = tiny_vgg_state_dicts()
    w = {k: torch.from_numpy(v) for k, v in timm_layout.items()}
    x = np.random.default_rng(1).standard_normal((2, 3, 14, 14), dtype=np.float32)
    f = torch.nn.functional
    with torch.no_grad():
        h = f.max_pool2d(f.relu(f.conv2d(torch.from_numpy(x), w["features.0.weight"], w["features.0.bias"], padding=1)), 2)
        h = f.relu(f.conv2d(h, w["pre_logits.fc1.weight"], w["pre_logits.fc1.bias"]))
        h = f.relu(f.conv2d(h, w["pre_logits.fc2.weight"], w["pre_logits.fc2.bias"])).flatten(1)
        expected = f.linear(h, w["head.fc.weight"], w["head.fc.bias"]).numpy()
    model = VGG(layers=(8, "M"), classifier_widths=(16, 16), num_classes=5)
    logits = model.apply(from_torchvision(timm_layout, model), x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("classifier_widths", [(16, 16), ()], ids=["hidden-layers", "linear-on-7x7"])
def test_fresh_vgg_classifier_has_the_shapes_and_init_of_the_models_own(classifier_widths):
    from jaxres.models import VGG
    from jaxres.weights.head import fresh_classifier

    model = VGG(layers=(8, "M"), classifier_widths=classifier_widths, num_classes=3)
    layer = model.classifier_path()
    assert layer == ("head", f"fc{len(classifier_widths) + 1}")
    own = model.init(jax.random.key(1), jnp.zeros((1, 14, 14, 3)))["params"][layer[0]][layer[1]]
    fresh = fresh_classifier(model, jax.random.key(1))
    assert fresh["kernel"].shape == own["kernel"].shape  # (8 * 7 * 7, 3) without hidden layers
    jax.tree.map(np.testing.assert_array_equal, fresh, dict(own))  # same rng, same module path


def test_num_classes_zero_loads_the_backbone_without_the_classifier(resnet18_safetensors, tmp_path):
    source, state_dict = resnet18_safetensors
    jaxres_file = tmp_path / "r18.safetensors"
    assert main(["convert", "torchvision", "--model", "resnet18", "--from", str(source), "--out", str(jaxres_file)]) == 0
    full, full_variables = jaxres.pretrained("resnet18", source)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    for weights in (source, jaxres_file):
        model, variables = jaxres.pretrained("resnet18", weights, num_classes=0)  # no warning: nothing is fresh
        assert jax.tree.structure(variables) == jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0), x))
        features = model.apply(variables, x)
        assert features.shape == (2, 512)
        # the 1000-class model's logits are these features through torchvision's fc
        expected = np.asarray(features) @ state_dict["fc.weight"].T + state_dict["fc.bias"]
        # random weights give logits near 1e23: float32 rounding is judged against that scale
        np.testing.assert_allclose(full.apply(full_variables, x), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_num_classes_zero_vgg_keeps_the_hidden_classifier_layers():
    from jaxres.models import VGG
    from jaxres.weights import from_torchvision

    torchvision_layout, _ = tiny_vgg_state_dicts()
    model = VGG(layers=(8, "M"), classifier_widths=(16, 16), num_classes=0)
    head = from_torchvision(torchvision_layout, model)["params"]["head"]
    assert sorted(head) == ["fc1", "fc2"]  # classifier.6 (the 5-class layer) left out
    np.testing.assert_array_equal(head["fc2"]["kernel"], torchvision_layout["classifier.3.weight"].T)
