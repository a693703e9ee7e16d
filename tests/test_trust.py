"""Names that cannot collide, a margin in whole images, and errors that say what happened."""


import pytest
from pydantic import ValidationError

from flows.cli import main
from flows.config import SweepConfig
from models.names import rates_sharing_a_name, trial_name

# --- rates whose trials would share a name ----------------------------------------------------

def test_rates_that_would_share_a_trial_name_are_refused(capsys):
    """0.001 and 0.0010000001 were both trial `lr0.001-seed0`: one W&B run name, one checkpoint
    folder, one trial alias for two trainings."""
    assert trial_name(0.001, 0) == trial_name(0.0010000001, 0)
    assert main(["run", "--learning-rates", "0.001", "0.0010000001", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "learning_rates:" in err and "lr0.001" in err and "Traceback" not in err


def test_rates_that_differ_within_six_digits_are_kept():
    assert SweepConfig(learning_rates=[0.001, 0.001001]).learning_rates == [0.001, 0.001001]
    assert rates_sharing_a_name([0.1, 0.01, 1e-5]) == {}
    with pytest.raises(ValidationError, match="share a trial name"):
        SweepConfig(learning_rates=[3e-4, 3.0000001e-4])


def test_a_sweep_id_that_leads_outside_the_output_dir_is_invalid_input(tmp_path, capsys):
    """A symlink in place of a sweep's folder: refused as input (exit 2), not a traceback."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "s1").symlink_to(tmp_path, target_is_directory=True)
    assert main(["publish", "s1", "--output-dir", str(tmp_path / "runs"), "--dry-run"]) == 2
    assert "invalid input:\npath: 's1' leads outside" in capsys.readouterr().err
