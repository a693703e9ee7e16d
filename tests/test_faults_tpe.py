"""TPE searches that survive their machines, and the study's storage kept secret and untouched:
a killed search resumed with new rates, a startup count that leaves room for TPE, stale trials
of a container that is gone, a storage check that writes nothing, a masked storage URL, and a
study named by everything that changes a trial's result."""

import json
import time

import optuna
import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from flows.cli import check_study_storage
from flows.config import SweepConfig
from flows.plan import validated
from flows.search import study_identity
from tasks.data.dataset import DatasetRef
from tasks.reporting.report import search_lines
from tasks.search.tpe import (
    STALE_AFTER_SECONDS,
    check_storage,
    heartbeats,
    open_study,
    recover_stale_trials,
    startup_trials,
    study_name,
    tpe_search,
)
from tests.helpers import trial_spec
from tests.test_search import FakeTraining

SEARCH = dict(parallel=1, lr_range=(1e-4, 1e-2), rungs=[1, 2], reduction_factor=2)
DISTRIBUTION = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}


def test_a_killed_and_resumed_search_tries_as_many_distinct_rates_as_an_uninterrupted_one(tmp_path):
    """Before: the resumed search's fresh TPESampler(seed) proposed the first run's rates again
    (while sampling at random, as a 9-trial search did throughout), and the study ended with
    fewer distinct rates than trials."""
    random_phase = dict(seed=0, n_startup_trials=6)
    whole = tpe_search(open_study(f"sqlite:///{tmp_path}/whole.db", "s", **random_phase),
                       n_trials=6, train_to=FakeTraining(), **SEARCH)
    url = f"sqlite:///{tmp_path}/killed.db"
    with pytest.raises(RuntimeError, match="worker lost"):  # dies in the middle of its 3rd trial
        tpe_search(open_study(url, "s", **random_phase), n_trials=6,
                   train_to=FakeTraining(fail_after_calls=3), **SEARCH)
    resumed = tpe_search(open_study(url, "s", **random_phase), n_trials=6, train_to=FakeTraining(), **SEARCH)
    assert len({t.learning_rate for t in whole.trials}) == 6
    assert len(resumed.trials) == 6
    assert len({t.learning_rate for t in resumed.trials}) == 6, [t.learning_rate for t in resumed.trials]


def test_the_startup_count_follows_the_budget_and_the_report_says_it(tmp_path):
    """Before: Optuna's default of 10 random trials made a 9-trial `--search tpe` random search."""
    assert [startup_trials(n) for n in (1, 3, 9, 30, 256)] == [1, 1, 3, 10, 10]
    study = open_study(f"sqlite:///{tmp_path}/o.db", "s", n_startup_trials=startup_trials(9))
    assert study.sampler._n_startup_trials == 3
    lines = search_lines({"method": "tpe", "rungs": [1, 3], "reduction_factor": 3, "epochs_trained": 9,
                          "grid_epochs": 27, "fraction_of_grid": 1 / 3, "epochs_saved": 18, "stopped_at": {},
                          "study": "lr-search-x", "storage": "sqlite:///o.db", "trials_now": 9,
                          "n_startup_trials": 3})
    assert "- TPE: the first 3 trial(s) sampled at random, the rest proposed by TPE from the trials before them." in lines


def test_a_stale_trial_of_a_gone_container_is_recovered_after_the_stated_time(tmp_path):
    """Before: a RUNNING trial whose owner was on another hostname stayed RUNNING forever."""
    study = open_study(f"sqlite:///{tmp_path}/o.db", "s")
    gone, alive = study.ask(DISTRIBUTION), study.ask(DISTRIBUTION)
    for trial, silent in ((gone, STALE_AFTER_SECONDS + 5), (alive, 30)):
        trial.set_user_attr("owner", {"host": "container-that-is-gone", "pid": 1, "start": 1})
        trial.set_user_attr("heartbeat", time.time() - silent)
    assert recover_stale_trials(study) == [gone.number]
    # A live driver keeps its trials' heartbeats fresh while a rung trains.
    trial = study.ask(DISTRIBUTION)
    trial.set_user_attr("heartbeat", 0.0)
    with heartbeats([trial], every=0.05):
        time.sleep(0.5)
    assert time.time() - study.trials[trial.number].user_attrs["heartbeat"] < 5


def test_the_storage_check_writes_nothing(tmp_path):
    """Before: the check created a study `lr-sweep-storage-check` in the user's database."""
    url = f"sqlite:///{tmp_path}/users.db"
    open_study(url, "the-users-study")
    config = SweepConfig(search="tpe", optuna_storage=url, output_dir=tmp_path / "runs")
    check_study_storage(config)
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["the-users-study"]
    check_storage(f"sqlite:///{tmp_path}/new/optuna.db")
    assert not (tmp_path / "new").exists()


def test_storage_credentials_are_masked_wherever_the_config_is_shown_or_stored(tmp_path):
    """Before: the password went to summary.json, to every dispatched trial's parameters and to
    --dry-run's output, all of which are model_dump of the config."""
    url = "postgresql://search:s3cr3t-pw@db.example:5432/optuna"
    config = SweepConfig(search="tpe", optuna_storage=url, output_dir=tmp_path / "runs")
    assert config.optuna_storage == url  # used at run time as given
    for dumped in (config.model_dump(mode="json"), config.model_dump(), config.model_copy().model_dump(mode="json")):
        assert dumped["optuna_storage"] == "postgresql://search:***@db.example:5432/optuna"
    assert "s3cr3t" not in config.model_dump_json()
    assert validated(config).optuna_storage == url  # the flow's own validation keeps it


def test_a_flow_run_gets_the_storage_password_and_prefect_stores_it_masked(prefect_server, tmp_path):
    url = "postgresql://search:s3cr3t-pw@db.example:5432/optuna"

    @flow(name="storage-password-check")
    def echo(config: SweepConfig) -> str:
        return config.optuna_storage

    state = echo(config=SweepConfig(search="tpe", optuna_storage=url, output_dir=tmp_path), return_state=True)
    assert state.result() == url
    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert "s3cr3t" not in json.dumps(stored) and "search:***@db.example" in json.dumps(stored)


def dataset(**changes) -> DatasetRef:
    values = dict(name="mnist", root="/data", fingerprint="f" * 64, val_size=200, split_seed=0, train_limit=None,
                  train_size=1200, test_size=300, mean=(0.1,), std=(0.3,))
    return DatasetRef(**(values | changes))


def test_the_study_is_named_by_everything_that_changes_a_trials_result():
    """Before: two searches with another val_size or split_seed shared one study."""
    config, base = SweepConfig(search="tpe"), trial_spec()
    names = {study_name(study_identity(config, d, base, [1, 3]))
             for d in (dataset(), dataset(val_size=300), dataset(split_seed=1), dataset(train_limit=500))}
    assert len(names) == 4
    assert study_name(study_identity(config, dataset(root="/elsewhere"), base, [1, 3])) == \
        study_name(study_identity(config, dataset(), base, [1, 3]))  # where the files are: no matter
