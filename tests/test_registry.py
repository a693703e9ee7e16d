import json
import threading

import pytest
import torch

from models.cnn import architecture, build_model
from models.registry import DigestMismatch, LocalRegistry, ModelNotFound
from models.serialization import WEIGHTS_FILE


def small_model(seed: int):
    torch.manual_seed(seed)
    arch = architecture(hidden_units=8)
    return build_model(arch).state_dict(), {"architecture": arch, "seed": seed}


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
    forged = type(ref)(ref.collection, ref.version, "0" * 64)
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
