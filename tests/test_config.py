import pytest
import yaml
from pydantic import ValidationError

from jointdistill.config import Params, apply_overrides, load_params, params_from_dict
from jointdistill.errors import ConfigError

from .conftest import REPO


def test_repo_params_file_is_valid_and_matches_design_keys():
    p = load_params(REPO / "params.yaml")
    assert p.prepare.dataset == "synthetic"
    assert p.prepare.val_fraction == 0.15
    # DESIGN §7: keys that must exist
    for section, keys in {
        "prepare": ["dataset", "root", "num_samples", "height", "width", "val_fraction"],
        "teacher": ["epochs", "batch_size"],
        "distill": ["mode", "epochs", "alpha", "beta", "top_k", "trajectory_length", "probe_images"],
        "export": ["opset"],
    }.items():
        for key in keys:
            assert hasattr(getattr(p, section), key), f"{section}.{key}"


def test_unknown_key_names_path_and_suggests():
    with pytest.raises(ConfigError) as err:
        params_from_dict({"prepare": {"num_sampels": 10}}, "params.yaml")
    msg = str(err.value)
    assert "prepare.num_sampels: unknown key" in msg
    assert "did you mean 'prepare.num_samples'" in msg
    assert msg.startswith("params.yaml: ")


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"prepar: unknown key; did you mean 'prepare'"):
        params_from_dict({"prepar": {}})


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"prepare": {"val_fraction": 1.5}}, "prepare.val_fraction: Input should be less than 1"),
        ({"prepare": {"height": "tall"}}, "prepare.height: Input should be a valid integer"),
        ({"prepare": {"dataset": "imagenet"}}, "prepare.dataset: Input should be 'synthetic'"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"augment": {"scale_min": 2.0, "scale_max": 1.0}}, "scale_min must not exceed scale_max"),
    ],
)
def test_bad_values_name_key_and_reason(data, fragment):
    with pytest.raises(ConfigError) as err:
        params_from_dict(data)
    assert fragment in str(err.value)


def test_overrides_are_validated_like_the_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("prepare:\n  height: 64\n")
    p = load_params(f, ["prepare.width=80", "seed=3"])
    assert (p.prepare.height, p.prepare.width, p.seed) == (64, 80, 3)
    with pytest.raises(ConfigError, match="prepare.widht: unknown key"):
        load_params(f, ["prepare.widht=80"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_params(f, ["prepare.width"])
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(listy)


def test_digest_is_stable_and_sensitive():
    a, b = Params(), Params()
    assert a.digest() == b.digest()
    assert a.digest() != params_from_dict({"prepare": {"height": 64}}).digest()


def test_params_are_immutable():
    p = Params()
    with pytest.raises(ValidationError, match="frozen"):
        p.seed = 3


def test_a_real_dataset_without_a_root_fails_when_prepare_starts(tmp_path):
    """Valid params (a Kubeflow run pinned to a DVC version supplies the root), one clear error at run time."""
    from jointdistill.stages import prepare

    p = params_from_dict({"prepare": {"dataset": "nyuv2"}})
    with pytest.raises(ConfigError, match="prepare.root is required for dataset 'nyuv2'"):
        prepare.run(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bare_on_off_in_yaml_mean_the_words():
    """YAML reads `compile: on` as true: the switches take it as "on" (also in a per-teacher override)."""
    raw = yaml.safe_load(
        "teacher: {compile: on, channels_last: off, amp: off, seg: {compile: off}}\ndistill: {compile: on}\n"
    )
    assert raw["teacher"]["compile"] is True  # what YAML gives us
    p = params_from_dict(raw)
    assert (p.teacher.compile, p.teacher.channels_last, p.teacher.amp, p.distill.compile) == ("on", "off", "off", "on")
    assert p.teacher.for_task("seg").compile == "off" and p.teacher.for_task("depth").compile == "on"


def test_an_error_blames_the_set_that_gave_the_value(tmp_path):
    """A value given with --set is named as such, not as a value in the params file."""
    from jointdistill.config import load_params

    with pytest.raises(ConfigError) as err:
        load_params(REPO / "params.yaml", ["pipeline.teacher.accelerator_limit=1"])
    message = str(err.value)
    assert (
        message.startswith("--set pipeline.teacher.accelerator_limit=1: pipeline.teacher:")
        and "params.yaml" not in message
    )
    with pytest.raises(ConfigError, match=r"p\.yaml: prepare\.height"):
        path = tmp_path / "p.yaml"
        path.write_text("prepare:\n  height: -3\n")
        load_params(path, ["distill.lr=0.1"])


def test_brief_never_cuts_a_sentence():
    from jointdistill.errors import brief

    assert brief("short\nsecond line") == "short"
    long = "The first sentence is here. " + "word " * 100
    assert brief(long, 80) == "The first sentence is here. …"
    words = "word " * 100
    cut = brief(words, 50)
    assert cut.endswith(" …") and len(cut) <= 52 and not cut.removesuffix(" …").endswith("wor")
