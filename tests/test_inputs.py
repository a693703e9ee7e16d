"""Bad input: a clear error before anything runs, naming the field; the registry is untouched."""

import hashlib
import re
from pathlib import Path

import pytest
import torch

from flows.cli import main
from models.cnn import architecture, build_model
from models.registry import LocalRegistry

BAD_INPUTS = [
    # (extra CLI arguments, environment, the field the message must name, a fragment of what is allowed)
    (["--learning-rates", "-0.1"], {}, "learning_rates", "> 0"),
    (["--learning-rates", "0"], {}, "learning_rates", "> 0"),
    (["--learning-rates", "nan"], {}, "learning_rates", "finite"),
    (["--learning-rates", "inf"], {}, "learning_rates", "finite"),
    (["--learning-rates", "0.001", "0.001"], {}, "learning_rates", "unique"),
    (["--learning-rates", "fast"], {}, "learning_rates", "valid number"),
    (["--learning-rates", *[str(0.001 * (i + 1)) for i in range(65)]], {}, "learning_rates", "at most 64"),
    (["--seeds", "-1"], {}, "seeds", "[0, 2**31)"),
    (["--seeds", "0", "0"], {}, "seeds", "unique"),
    (["--epochs", "0"], {}, "epochs", "greater than or equal to 1"),
    (["--epochs", "1001"], {}, "epochs", "less than or equal to 1000"),
    (["--batch-size", "0"], {}, "batch_size", "greater than or equal to 1"),
    (["--hidden-units", "0"], {}, "hidden_units", "greater than or equal to 1"),
    (["--dataset", "cifar10"], {}, "dataset", "'fashion-mnist', 'mnist' or 'kmnist'"),
    (["--device", "tpu"], {}, "device", "auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], {}, "device", "not available"),
    (["--alias", "prod/1"], {}, "alias", "no '/', ':'"),
    (["--alias", "prod:1"], {}, "alias", "no '/', ':'"),
    (["--alias", ""], {}, "alias", "1-128 characters"),
    (["--alias", "x" * 129], {}, "alias", "1-128 characters"),
    (["--alias", "latest"], {}, "alias", "not 'latest'"),
    (["--val-size", "0"], {}, "val_size", "greater than or equal to 1"),
    (["--val-size", "60000"], {}, "val_size", "less than or equal to 59000"),
    (["--train-limit", "0"], {}, "train_limit", "greater than or equal to 1"),
    (["--optimizer", "rmsprop"], {}, "optimizer", "'adam', 'adamw' or 'sgd'"),
    (["--selection-metric", "test_accuracy"], {}, "selection_metric", "'val_accuracy' or 'val_loss'"),
    (["--promotion-margin", "-0.1"], {}, "promotion_margin", "greater than or equal to 0"),
    (["--split-seed", "-1"], {}, "split_seed", "greater than or equal to 0"),
    (["--sweep-id", "my sweep/1"], {}, "sweep_id", "1-96 characters"),
    (["--wandb-mode", "online"], {}, "config", "needs a W&B API key"),
    (["--registry", "wandb"], {}, "config", "needs wandb_mode='online'"),
    (["--output-dir", "/etc/hostname/runs"], {}, "output_dir", "is not a directory"),
    ([], {"LR_SWEEP_EPOCHS": "zero"}, "epochs", "valid integer"),
    ([], {"LR_SWEEP_LEARNING_RATES": "[0.1, -2]"}, "learning_rates", "> 0"),
]


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def registry_with_production(tmp_path):
    registry = LocalRegistry(tmp_path / "registry")
    torch.manual_seed(0)
    arch = architecture(8)
    ref = registry.log_model("fashion-mnist-cnn", build_model(arch).state_dict(), {"architecture": arch})
    registry.move_alias(ref, "production")
    return tmp_path / "registry"


def test_the_table_is_large_enough():
    assert len(BAD_INPUTS) >= 20


@pytest.mark.parametrize("arguments, environment, field, allowed", BAD_INPUTS,
                         ids=[f"{f}-{i}" for i, (_, _, f, _) in enumerate(BAD_INPUTS)])
def test_bad_input_fails_early_and_changes_nothing(arguments, environment, field, allowed, tmp_path,
                                                   registry_with_production, monkeypatch, capsys):
    if field == "device" and torch.cuda.device_count() > 99:
        pytest.skip("this machine has a cuda:99")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    before = snapshot(registry_with_production)
    output = tmp_path / "runs"
    code = main(["run", "--registry-dir", str(registry_with_production), "--output-dir", str(output),
                 "--data-dir", str(tmp_path / "data"), *arguments])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(rf"\n{field}(\[\d+\])?: ", err), err
    assert allowed in err, err
    assert "Traceback" not in err
    assert snapshot(registry_with_production) == before
    assert not output.exists()  # nothing ran
