import json
import os
import threading

import pytest
import torch

from models.cnn import build_model
from models.files import atomic_write
from models.local_registry import ALIASES_FILE, PROMOTIONS_FILE, LocalRegistry
from models.names import check_name, inside
from models.registry import DigestMismatch, ModelNotFound, ModelRef, split_name
from models.serialization import WEIGHTS_FILE
from tests.helpers import tiny_model as small_model


def test_versions_count_up_and_latest_moves(tmp_path):
    registry = LocalRegistry(tmp_path)
    refs = [registry.log_model("col", *small_model(seed)) for seed in range(3)]
    assert [r.version for r in refs] == ["v0", "v1", "v2"]
    assert registry.resolve("col", "latest") == refs[2]
    assert [v.ref for v in registry.versions("col")] == refs
    assert registry.versions("col")[2].aliases == ["latest"]


def test_fetch_returns_the_same_weights_and_metadata(tmp_path):
    registry = LocalRegistry(tmp_path)
    state, metadata = small_model(1)
    ref = registry.log_model("col", state, metadata)
    stored = registry.fetch(ref)
    assert stored.metadata == metadata
    assert all(torch.equal(stored.state_dict[k], state[k]) for k in state)
    assert registry.fetch("col:v0").ref == ref
    model = build_model(stored.metadata["architecture"])
    model.load_state_dict(stored.state_dict)  # rebuilt from metadata alone


def test_an_alias_is_held_by_one_version_at_a_time(tmp_path):
    registry = LocalRegistry(tmp_path)
    first = registry.log_model("col", *small_model(0))
    second = registry.log_model("col", *small_model(1))
    assert registry.move_alias(first, "production") is None
    assert registry.move_alias(second, "production") == first
    holders = [v.ref for v in registry.versions("col") if "production" in v.aliases]
    assert holders == [second]
    log = [json.loads(line) for line in (tmp_path / "col" / "promotions.jsonl").read_text().splitlines()]
    assert [(r["version"], r["previous"]) for r in log] == [("v0", None), ("v1", "v0")]


def test_a_tampered_version_is_refused(tmp_path):
    registry = LocalRegistry(tmp_path)
    ref = registry.log_model("col", *small_model(0))
    path = tmp_path / "col" / ref.version / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        registry.fetch(ref)


def test_a_reference_with_another_digest_is_refused(tmp_path):
    registry = LocalRegistry(tmp_path)
    ref = registry.log_model("col", *small_model(0))
    forged = ref.model_copy(update={"digest": "0" * 64})
    with pytest.raises(DigestMismatch):
        registry.fetch(forged)


def test_unknown_names_are_not_found(tmp_path):
    registry = LocalRegistry(tmp_path)
    registry.log_model("col", *small_model(0))
    assert registry.resolve("col", "production") is None
    with pytest.raises(ModelNotFound):
        registry.fetch("col:v9")


def test_concurrent_writers_get_distinct_versions(tmp_path):
    registry = LocalRegistry(tmp_path)
    refs = []
    threads = [threading.Thread(target=lambda s=s: refs.append(registry.log_model("col", *small_model(s))))
               for s in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(int(r.version[1:]) for r in refs) == list(range(8))
    assert not [p for p in (tmp_path / "col").iterdir() if p.name.startswith(".staging")]


# --- names that stay in their folders ---------------------------------------------------

@pytest.mark.parametrize("kind, name", [
    ("sweep_id", ".."), ("sweep_id", "."), ("sweep_id", ".hidden"), ("sweep_id", "a/b"), ("sweep_id", "ok\n"),
    ("sweep_id", "checkpoints"), ("sweep_id", "wandb"), ("sweep_id", ""), ("sweep_id", "x" * 97),
    ("collection", "../x"), ("collection", ".."), ("alias", "latest"), ("alias", "v0"), ("alias", "v12"),
    ("alias", "a:b"), ("alias", "a b"), ("version", "v1x"), ("version", "../v0"),
])
def test_names_that_could_leave_their_folder_are_refused(kind, name):
    with pytest.raises(ValueError, match=kind):
        check_name(kind, name)


@pytest.mark.parametrize("kind, name", [("sweep_id", "20260101-a.b_c-1"), ("collection", "fashion-mnist-cnn"),
                                        ("alias", "production"), ("alias", "v1-candidate"), ("version", "v12")])
def test_ordinary_names_pass(kind, name):
    assert check_name(kind, name) == name


def test_inside_refuses_a_path_that_resolves_outside_its_root(tmp_path):
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path, tmp_path / "root" / "escape")
    assert inside(tmp_path / "root", "a") == (tmp_path / "root" / "a").resolve()
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path / "root", "escape", "x")
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path / "root", "..")


def test_registry_names_are_checked_on_every_path(tmp_path):
    registry = LocalRegistry(tmp_path / "registry")
    with pytest.raises(ValueError, match="collection"):
        registry.log_model("..", *small_model(0))
    ref = registry.log_model("col", *small_model(0))
    for alias in ("latest", "v0", "a:b", "../x"):
        with pytest.raises(ValueError, match="alias"):
            registry.move_alias(ref, alias)
    with pytest.raises(ValueError, match="version"):
        registry.fetch(ref.model_copy(update={"version": "../../x"}))
    with pytest.raises(ValueError):
        split_name("col:../x")
    assert not (tmp_path / "x").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["registry"]


def test_latest_cannot_be_taken_by_a_move(tmp_path):
    registry = LocalRegistry(tmp_path)
    first = registry.log_model("col", *small_model(0))
    registry.log_model("col", *small_model(1))
    with pytest.raises(ValueError, match="'latest'"):
        registry.move_alias(first, "latest")
    assert registry.resolve("col", "latest").version == "v1"


# --- crash windows --------------------------------------------------------------------------------

def test_latest_is_the_newest_complete_version_even_after_a_crash_before_the_alias_write(tmp_path):
    registry = LocalRegistry(tmp_path)
    registry.log_model("col", *small_model(0))
    # A crash between the rename of v1 and any table write: v1 exists, no table mentions it.
    table_before = (tmp_path / "col" / ALIASES_FILE).read_text() if (tmp_path / "col" / ALIASES_FILE).exists() else None
    second = registry.log_model("col", *small_model(1))
    if table_before is None:
        (tmp_path / "col" / ALIASES_FILE).unlink(missing_ok=True)
    else:
        (tmp_path / "col" / ALIASES_FILE).write_text(table_before)
    assert registry.resolve("col", "latest") == second
    assert registry.versions("col")[-1].aliases == ["latest"]


def test_a_dead_writers_staging_folder_is_removed_by_the_next_writer(tmp_path):
    registry = LocalRegistry(tmp_path)
    registry.log_model("col", *small_model(0))
    leftover = tmp_path / "col" / ".staging-deadbeef"
    leftover.mkdir()
    (leftover / WEIGHTS_FILE).write_bytes(b"half")
    registry.log_model("col", *small_model(1))
    assert not leftover.exists()
    assert [v.ref.version for v in registry.versions("col")] == ["v0", "v1"]


def test_a_logged_move_whose_table_write_was_lost_is_applied(tmp_path):
    registry = LocalRegistry(tmp_path)
    first = registry.log_model("col", *small_model(0))
    second = registry.log_model("col", *small_model(1))
    registry.move_alias(first, "production")
    table = (tmp_path / "col" / ALIASES_FILE).read_text()
    registry.move_alias(second, "production")
    atomic_write(tmp_path / "col" / ALIASES_FILE, table)  # the crash: logged, table not replaced
    registry.log_model("col", *small_model(2))  # any next change under the lock recovers
    assert registry.resolve("col", "production") == second
    log = [json.loads(line) for line in (tmp_path / "col" / PROMOTIONS_FILE).read_text().splitlines()]
    assert [(r["version"], r["previous"]) for r in log] == [("v0", None), ("v1", "v0")]


def test_a_torn_last_log_line_is_ignored(tmp_path):
    registry = LocalRegistry(tmp_path)
    first = registry.log_model("col", *small_model(0))
    registry.move_alias(first, "production")
    with open(tmp_path / "col" / PROMOTIONS_FILE, "a") as log:
        log.write('{"alias": "production", "vers')
    second = registry.log_model("col", *small_model(1))
    assert registry.resolve("col", "production") == first
    registry.move_alias(second, "production")
    assert registry.resolve("col", "production") == second


def test_a_move_to_a_name_holding_another_digest_is_refused(tmp_path):
    registry = LocalRegistry(tmp_path)
    ref = registry.log_model("col", *small_model(0))
    with pytest.raises(DigestMismatch):
        registry.move_alias(ModelRef(collection="col", version=ref.version, digest="1" * 64), "production")
    assert registry.resolve("col", "production") is None
