from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from synthct.config import ConfigError, load_config, packaged_config_path


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _demo_doc() -> dict:
    return yaml.safe_load(packaged_config_path("demo").read_text())


def test_packaged_configs_validate():
    demo = load_config(packaged_config_path("demo"))
    smoke = load_config(packaged_config_path("smoke"))
    assert demo.data.shape == (32, 32, 32)
    assert smoke.data.shape == (16, 16, 16)
    assert demo.labels.classes[-1] == "consolidation"
    chest64, chest128 = load_config("chest64"), load_config("chest128")
    assert chest64.data.shape == (64,) * 3 and chest64.data.spacing_mm == (3.0,) * 3
    assert chest128.data.shape == (128,) * 3 and chest128.data.spacing_mm == (1.5,) * 3
    assert chest128.train.ae_patch == (64, 64, 64) and chest128.autoencoder.gradient_checkpointing


def test_demo_rare_class_share_and_a_site_without_it(demo_config):
    total = sum(sum(s.counts.values()) for s in demo_config.data.sites)
    rare = sum(s.counts.get("consolidation", 0) for s in demo_config.data.sites)
    assert rare / total <= 0.05
    assert any(s.counts.get("consolidation", 0) == 0 for s in demo_config.data.sites)
    assert len(demo_config.data.sites) >= 4


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["data"]["sites"][2].__setitem__("noise_hu", -5),
            "data.sites[2].noise_hu = -5",
        ),
        (
            lambda d: d["data"]["sites"][1].__setitem__("noise_hu", "loud"),
            "data.sites[1].noise_hu = 'loud'",
        ),
        (lambda d: d["data"].__setitem__("shpe", [32, 32, 32]), "data.shpe"),
        (lambda d: d["data"].__setitem__("shape", [30, 32, 32]), "data.shape"),
        (lambda d: d["data"]["splits"].__setitem__("test", 0.5), "data.splits"),
        (  # a test fraction beside a balanced test set: two sources of test cases
            lambda d: d["data"].__setitem__("splits", {"train": 0.6, "holdout": 0.2, "test": 0.2}),
            "splits.test must be 0 when test_per_class > 0",
        ),
        (lambda d: d["data"].__setitem__("test_per_class", 0), "no test split"),
        (
            lambda d: d["data"]["lesions"].__setitem__("consolidation_cut", [0.7, 0.45]),
            "data.lesions.consolidation_cut",
        ),
        (
            lambda d: d["data"]["sites"][0]["counts"].__setitem__("tumour", 3),
            "data.sites[0].counts.tumour",
        ),
        (
            lambda d: d["data"]["sites"][1]["label_map"].__setitem__("x", "tumour"),
            "data.sites[1].label_map.x",
        ),
        (lambda d: d["labels"].__setitem__("rare", ["tumour"]), "labels"),
        (  # patches must be whole latent cells and fit the volume
            lambda d: d["train"].__setitem__("ae_patch", [13, 16, 16]),
            "train.ae_patch = [13, 16, 16]",
        ),
        (lambda d: d["train"].__setitem__("ae_patch", [64, 16, 16]), "train.ae_patch"),
        (lambda d: d["federated"].__setitem__("num_gpus", 2), "federated.num_gpus"),
        (lambda d: d.__delitem__("labels"), "labels = '<missing>'"),
    ],
)
def test_bad_config_names_file_key_and_value(tmp_path, mutate, expected):
    doc = _demo_doc()
    mutate(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_vocabulary_hash_depends_on_order(demo_config):
    from synthct.config import LabelConfig

    a = LabelConfig(classes=["a", "b"])
    b = LabelConfig(classes=["b", "a"])
    assert a.vocabulary_hash != b.vocabulary_hash
    assert len(demo_config.labels.vocabulary_hash) == 16


def test_label_mapping_and_unmapped_label(demo_config):
    assert demo_config.resolve_label("site_b", "GGO") == "ground_glass"
    assert demo_config.resolve_label("site_a", "nodule") == "nodule"
    with pytest.raises(KeyError, match="site 'site_a': label 'GGO'"):
        demo_config.resolve_label("site_a", "GGO")


def test_loss_only_fields_do_not_block_reusing_weights(smoke_config):
    doc = smoke_config.model_dump()
    doc["autoencoder"].update({"detail_weight": 3.0, "kl_weight": 1e-4, "edge_weight": 0.1})
    assert type(smoke_config).model_validate(doc).network_mismatch(smoke_config) is None
    doc["autoencoder"]["latent_channels"] = 3
    mismatch = type(smoke_config).model_validate(doc).network_mismatch(smoke_config)
    assert mismatch == "the 'autoencoder' sections differ"


def test_detail_window_must_be_ordered(smoke_config):
    doc = smoke_config.model_dump()
    doc["autoencoder"]["detail_window_hu"] = (-300.0, -1000.0)
    with pytest.raises(ValueError, match="detail_window_hu"):
        type(smoke_config).model_validate(doc)


def test_packaged_names_and_set_overrides_are_validated_like_the_file(tmp_path):
    from synthct.config import load_config

    assert load_config("smoke").data.shape == (16, 16, 16)
    config = load_config("demo", ["train.batch_size=2", "sampling.guidance=4.5"])
    assert config.train.batch_size == 2 and config.sampling.guidance == 4.5
    with pytest.raises(ConfigError, match=r"train.batch_sise = 2: unknown key"):
        load_config("demo", ["train.batch_sise=2"])
    with pytest.raises(ConfigError, match=r"train.batch_size"):
        load_config("demo", ["train.batch_size=-1"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config("demo", ["seed"])
    with pytest.raises(ConfigError, match="packaged names: demo, smoke"):
        load_config(tmp_path / "nope.yaml")


def test_config_show_prints_a_config_that_loads_back_to_the_same(tmp_path, capsys):
    from synthct.cli import main
    from synthct.config import load_config

    assert main(["config", "show", "--config", "smoke", "--set", "seed=7"]) == 0
    shown = tmp_path / "shown.yaml"
    shown.write_text(capsys.readouterr().out)
    assert load_config(shown) == load_config("smoke", ["seed=7"])
    assert main(["config", "validate", str(shown)]) == 0
    assert main(["config", "validate", "demo", "--set", "data.spacing_mm=[0, 1, 1]"]) == 2
    assert "data.spacing_mm" in capsys.readouterr().err


def test_dp_with_fedprox_is_refused_with_the_reason(smoke_config):
    doc = smoke_config.model_dump()
    doc["federated"].update({"strategy": "fedprox", "privacy": {"enabled": True}})
    with pytest.raises(ValueError, match="FedProx run would have no epsilon"):
        type(smoke_config).model_validate(doc)
