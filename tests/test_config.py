import pytest
from pydantic import ValidationError

from flows.cli import build_parser, main, parse_config
from flows.config import SweepConfig, describe_validation_error


def test_defaults_are_the_reference_experiment():
    config = SweepConfig()
    assert config.learning_rates == [0.001, 0.0005, 0.0001]
    assert (config.batch_size, config.epochs, config.hidden_units) == (64, 5, 128)
    assert config.seeds == [0]
    assert config.dataset == "fashion-mnist"
    assert config.val_size is None  # one sixth of the training images: 10,000 of the 60k built-ins
    assert (config.image_size, config.num_workers) == (None, 2)
    assert config.optimizer == "adam"
    assert config.selection_metric == "val_accuracy"
    assert config.alias == "production"
    assert config.device == "auto"
    assert config.wandb_mode == "offline"
    assert config.registry == "local"
    assert config.train_limit is None


def test_every_field_is_settable_from_the_environment(monkeypatch):
    monkeypatch.setenv("LR_SWEEP_LEARNING_RATES", "[0.01, 0.02]")
    monkeypatch.setenv("LR_SWEEP_EPOCHS", "2")
    monkeypatch.setenv("LR_SWEEP_DATASET", "kmnist")
    monkeypatch.setenv("LR_SWEEP_TRAIN_LIMIT", "500")
    config = SweepConfig()
    assert config.learning_rates == [0.01, 0.02]
    assert config.epochs == 2
    assert config.dataset == "kmnist"
    assert config.train_limit == 500


def test_environment_values_are_validated_too(monkeypatch):
    monkeypatch.setenv("LR_SWEEP_BATCH_SIZE", "0")
    with pytest.raises(ValidationError) as caught:
        SweepConfig()
    assert describe_validation_error(caught.value).startswith("batch_size:")


@pytest.mark.parametrize("field, value, fragment", [
    ("learning_rates", [], "at least one"),
    ("learning_rates", [0.001, 0.001], "unique"),
    ("learning_rates", [float("nan")], "finite"),
    ("dataset", "cifar10", "fashion-mnist, mnist, kmnist, imagefolder:PATH, package.module:function or "
                           "path/to/file.py:function"),
    ("alias", "prod:1", "no '/', ':'"),
    ("device", "tpu", "auto, cpu, cuda or cuda:N"),
    ("unknown_field", 1, "Extra inputs are not permitted"),
])
def test_bad_values_name_the_field_and_what_is_allowed(field, value, fragment):
    with pytest.raises(ValidationError) as caught:
        SweepConfig(**{field: value})
    message = describe_validation_error(caught.value)
    assert message.startswith(f"{field}:")
    assert fragment in message


def test_every_config_field_has_a_cli_flag_with_the_same_name():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    flags = {option for action in run._actions for option in action.option_strings}
    for name in SweepConfig.model_fields:
        assert "--" + name.replace("_", "-") in flags


def test_cli_flags_become_config_values():
    args = build_parser().parse_args(["run", "--learning-rates", "0.001", "0.0001", "--epochs", "1",
                                      "--train-limit", "2000", "--seeds", "0", "1", "--output-dir", "D"])
    config = parse_config(args)
    assert config.learning_rates == [0.001, 0.0001]
    assert config.seeds == [0, 1]
    assert config.epochs == 1 and config.train_limit == 2000
    assert str(config.output_dir) == "D"
    assert config.batch_size == 64  # untouched fields keep SweepConfig's default


def test_cli_bad_input_exits_2_without_traceback(capsys):
    assert main(["run", "--learning-rates", "-0.1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "learning_rates:" in err and "Traceback" not in err


def test_trial_grid_is_rates_times_seeds_in_a_fixed_order():
    config = SweepConfig(learning_rates=[0.1, 0.01], seeds=[3, 1])
    assert config.trial_grid() == [(0.1, 3), (0.1, 1), (0.01, 3), (0.01, 1)]


def test_validation_is_pure_and_the_preflight_probes_the_machine(tmp_path):
    """A GPU deployment's config validates on a machine without that GPU (`--dry-run --device
    cuda:7` on a laptop); the run's pre-flight is what refuses it, naming the field."""
    import torch

    from flows.preflight import check_device
    from models.errors import InputError

    config = SweepConfig(device="cuda:7", output_dir=tmp_path / "nowhere" / "yet")
    assert config.device == "cuda:7" and not (tmp_path / "nowhere").exists()
    if torch.cuda.device_count() <= 7:
        with pytest.raises(InputError, match="not available") as caught:
            check_device("cuda:7")
        assert caught.value.field == "device"
