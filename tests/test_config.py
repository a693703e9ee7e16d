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


def test_a_preset_may_group_its_fields_in_tables_named_after_the_groups(tmp_path):
    preset = tmp_path / "grouped.toml"
    preset.write_text('alias = "staging"\n[grid]\nlearning_rates = [0.01]\n[training]\nepochs = 2\n'
                      'lr_schedule = "step"\n[data]\ntrain_limit = 100\n')
    config = parse_config(build_parser().parse_args(["run", "--config", str(preset)]))
    assert (config.learning_rates, config.epochs, config.lr_schedule, config.train_limit, config.alias) == \
        ([0.01], 2, "step", 100, "staging")


def test_a_field_in_another_groups_table_is_refused_naming_its_group(tmp_path):
    preset = tmp_path / "wrong.toml"
    preset.write_text('[training]\ndataset = "mnist"\n')
    with pytest.raises(ValidationError, match=r"\[training\] dataset: not a field of the training group"):
        parse_config(build_parser().parse_args(["run", "--config", str(preset)]))


def test_the_run_forms_labels_take_their_section_from_the_fields_group():
    from prefect.utilities.callables import parameter_schema

    from flows.sweep import lr_sweep

    schema = parameter_schema(lr_sweep).model_dump()
    titles = [field["title"] for field in schema["definitions"]["SweepConfig"]["properties"].values()]
    assert titles[:3] == ["1 Experiment · learning rates", "1 Experiment · seeds", "1 Experiment · epochs"]
    assert "2 Search · method" in titles and "3 Infrastructure · device" in titles and "4 Storage · sweep id" in titles
