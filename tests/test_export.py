"""tasks.export: a promoted model becomes a bundle (TorchScript, torch.export, card, bundle.json).

A small model is logged into a LocalRegistry under tmp_path; no Prefect, no data files.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.events.schemas.events import Resource

from flows.export import lr_sweep_export
from models.cnn import architecture, build_model
from models.local_registry import LocalRegistry
from models.registry import DigestMismatch
from tasks.evaluation.evaluate import place_model
from tasks.export import (
    AliasNotFound,
    ExportError,
    ExportMismatch,
    HolderChanged,
    InvalidName,
    NotInThisRegistry,
    bundle_name,
    export_bundle,
)
from tasks.reporting.artifact_keys import artifact_key
from tests.conftest import REPO_ROOT

# torch 2.14 marks torch.jit deprecated; loading model.pt the way a consumer would is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

COLLECTION = "fashion-mnist-cnn"
MEAN, STD = 0.286, 0.353


def metadata(learning_rate: float, seed: int) -> dict:
    return {
        "architecture": architecture(hidden_units=16),
        "training": {"learning_rate": learning_rate, "seed": seed, "epochs": 2, "batch_size": 64,
                     "hidden_units": 16, "optimizer": "adam"},
        "metrics": {"val_accuracy": 0.875, "val_loss": 0.35, "train_accuracy": 0.9, "train_loss": 0.3},
        "dataset": {"name": "fashion-mnist", "fingerprint": "f" * 64, "mean": MEAN, "std": STD,
                    "train_size": 1000, "val_size": 2000, "split_seed": 0, "test_size": 10000},
        "sweep_id": "test-sweep",
        "code": {"training_source_sha256": "c" * 64, "git_commit": "0123abc"},
        "packages": {"python": "3.11", "torch": torch.__version__},
    }


def log(registry: LocalRegistry, learning_rate: float, seed: int, aliases=()):
    torch.manual_seed(seed)
    model = build_model(architecture(hidden_units=16))
    return registry.log_model(COLLECTION, model.state_dict(), metadata(learning_rate, seed), aliases=aliases)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def eager(registry: LocalRegistry, ref) -> torch.nn.Module:
    stored = registry.fetch(ref)
    model = build_model(stored.metadata["architecture"])
    model.load_state_dict(stored.state_dict)
    return place_model(model, "cpu").eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One model promoted to `production` and exported once for the tests that only read."""
    root = tmp_path_factory.mktemp("export")
    registry = LocalRegistry(root / "registry")
    log(registry, 0.01, 1)
    ref = log(registry, 0.001, 0, aliases=("production",))
    bundle = export_bundle(registry, COLLECTION, "production", ref.digest, root / "exports")
    return registry, ref, bundle, root / "exports"


def test_the_bundle_holds_the_promoted_model_and_its_facts(exported):
    registry, ref, bundle, output_dir = exported
    path = Path(bundle["path"])
    assert path == (output_dir / f"{COLLECTION}-v1-{ref.digest[:12]}").resolve() == (output_dir / bundle_name(ref)).resolve()
    assert sorted(os.listdir(output_dir)) == [path.name]  # no staging folder left behind
    assert sorted(os.listdir(path)) == ["bundle.json", "model.pt", "model.pt2", "model_card.md"]
    on_disk = json.loads((path / "bundle.json").read_text())
    assert on_disk == {k: v for k, v in bundle.items() if k not in ("path", "reused")}
    assert (on_disk["model"], on_disk["version"], on_disk["digest"], on_disk["alias"]) == (
        "fashion-mnist-cnn:v1", "v1", ref.digest, "production")
    assert on_disk["training"]["learning_rate"] == 0.001 and on_disk["metrics"]["val_accuracy"] == 0.875
    assert on_disk["input"] | {} == {"shape": [None, 1, 28, 28], "dtype": "float32", "scale": "pixels / 255",
                                     "mean": MEAN, "std": STD}
    assert on_disk["files"] == {name: sha256(path / name) for name in ("model.pt", "model.pt2", "model_card.md")}
    check = on_disk["verification"]
    assert check["max_abs_diff"] <= 1e-5 and check["tolerance"] == 1e-5 and check["predictions_agree"]
    assert check["batch"] == "64 random images (seed 0)"

    card = (path / "model_card.md").read_text()
    for fact in ("fashion-mnist-cnn:v1", ref.digest, "`production`", "| learning rate | 0.001 |", "| seed | 0 |",
                 "| epochs | 2 |", "| val_accuracy | 0.875 |", "f" * 64, f"(x - {MEAN}) / {STD}", "0123abc",
                 "torch.jit.load", f"torch {torch.__version__}"):
        assert fact in card, fact


def test_the_exported_modules_give_the_stored_weights_logits(exported):
    registry, ref, bundle, _ = exported
    path = Path(bundle["path"])
    images = (torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(5)) - MEAN) / STD  # another batch size
    with torch.inference_mode():
        expected = eager(registry, ref)(images.contiguous(memory_format=torch.channels_last))
        scripted = torch.jit.load(str(path / "model.pt"))(images)
        program = torch.export.load(str(path / "model.pt2")).module()(images)
    assert (scripted - expected).abs().max().item() <= 1e-5
    assert (program - expected).abs().max().item() <= 1e-5
    # ... and they are not just any network: another version's weights give other logits.
    with torch.inference_mode():
        other = eager(registry, registry.resolve(COLLECTION, "v0"))(images)
    assert (other - expected).abs().max().item() > 1e-3


def test_exporting_again_keeps_the_bundle_in_place(exported):
    registry, ref, bundle, output_dir = exported
    again = export_bundle(registry, COLLECTION, "production", ref.digest, output_dir)
    assert again["reused"] is True and again["path"] == bundle["path"]
    assert again["exported_at"] == bundle["exported_at"]


def test_real_images_are_normalised_with_the_metadata(tmp_path):
    registry = LocalRegistry(tmp_path / "registry")
    ref = log(registry, 0.001, 0, aliases=("production",))
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    bundle = export_bundle(str(tmp_path / "registry"), COLLECTION, "production", None, tmp_path / "out", sample_images=images)
    assert bundle["verification"]["batch"] == "10 test images" and bundle["verification"]["batch_size"] == 10
    assert bundle["verification"]["max_abs_diff"] <= 1e-5 and bundle["digest"] == ref.digest
    with pytest.raises(ExportError, match="sample images of shape"):
        export_bundle(registry, COLLECTION, "production", None, tmp_path / "out2", sample_images=torch.zeros(3, 32, 32))
    assert not (tmp_path / "out2").exists()


def test_an_alias_that_moved_on_since_the_promotion_is_not_exported(tmp_path):
    registry = LocalRegistry(tmp_path / "registry")
    promoted = log(registry, 0.001, 0, aliases=("production",))
    newer = log(registry, 0.0005, 0)
    registry.move_alias(newer, "production")  # promoted again before the export ran
    with pytest.raises(HolderChanged, match=r"held by v1 .* not by the promoted model"):
        export_bundle(registry, COLLECTION, "production", promoted.digest, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(AliasNotFound):
        export_bundle(registry, COLLECTION, "staging", None, tmp_path / "out")
    with pytest.raises(ExportError, match="not a SHA-256"):
        export_bundle(registry, COLLECTION, "production", promoted.digest[:12], tmp_path / "out")


def test_an_export_that_does_not_match_leaves_nothing_behind(tmp_path, monkeypatch):
    import tasks.export

    registry = LocalRegistry(tmp_path / "registry")
    ref = log(registry, 0.001, 0, aliases=("production",))
    monkeypatch.setattr(tasks.export, "TOLERANCE", -1.0)  # no difference passes, not even 0
    with pytest.raises(ExportMismatch, match="differs from the stored weights"):
        export_bundle(registry, COLLECTION, "production", ref.digest, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []  # the staging folder is gone, no bundle appeared


def test_a_model_without_its_normalisation_is_not_exported(tmp_path):
    registry = LocalRegistry(tmp_path / "registry")
    bare = metadata(0.001, 0)
    del bare["dataset"]["std"]
    ref = registry.log_model(COLLECTION, build_model(architecture(hidden_units=16)).state_dict(), bare, aliases=("production",))
    with pytest.raises(ExportError, match="no dataset mean/std"):
        export_bundle(registry, COLLECTION, "production", ref.digest, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_files_that_do_not_match_the_digest_are_refused(tmp_path):
    registry = LocalRegistry(tmp_path / "registry")
    ref = log(registry, 0.001, 0, aliases=("production",))
    weights = tmp_path / "registry" / COLLECTION / "v0" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        export_bundle(registry, COLLECTION, "production", ref.digest, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["collection", "alias"])
@pytest.mark.parametrize("name", ["", "../x", "..", ".hidden", "a/b", "/abs", "a b", "prod\n", "-x", "é", "x" * 129])
def test_names_that_are_not_plain_names_are_refused(tmp_path, field, name):
    arguments = {"collection": COLLECTION, "alias": "production"} | {field: name}
    with pytest.raises(InvalidName, match=field):
        export_bundle(LocalRegistry(tmp_path / "registry"), arguments["collection"], arguments["alias"], None,
                      tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "registry").exists()


def test_a_bundle_path_that_leads_outside_the_output_dir_is_refused(tmp_path):
    registry = LocalRegistry(tmp_path / "registry")
    ref = log(registry, 0.001, 0, aliases=("production",))
    output_dir, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    output_dir.mkdir()
    elsewhere.mkdir()
    (output_dir / bundle_name(ref)).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ExportError, match="outside"):
        export_bundle(registry, COLLECTION, "production", ref.digest, output_dir)
    assert os.listdir(elsewhere) == [] and os.listdir(output_dir) == [bundle_name(ref)]


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("model-card", "fashion-mnist-cnn") == "model-card-fashion-mnist-cnn"
    assert artifact_key("model-card", "My_Model.v2") == "model-card-my-model-v2"
    assert artifact_key("wandb", "lr0.001-seed0") == "wandb-lr0-001-seed0"


def test_the_export_deployment_is_triggered_by_promotions():
    """prefect.yaml: the trigger's shape; tests/test_promotion_chain.py shows it firing (-m slow).
    The event fills in what it selects (collection, alias, digest) and nothing else: the registry
    and the output directory are the deployment's."""
    project = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    specs = {d["name"]: d for d in project["deployments"] if d["entrypoint"] == "flows.export:lr_sweep_export"}
    assert {name: spec["work_pool"]["name"] for name, spec in specs.items()} == {
        "export-local": "lr-sweep-process", "export-docker": "lr-sweep-gpu"}
    for spec in specs.values():
        [trigger] = [DeploymentEventTrigger.model_validate(t) for t in spec["triggers"]]
        assert trigger.expect == {"lr-sweep.model.promoted"} and trigger.enabled
        assert trigger.match.matches(Resource({"prefect.resource.id": f"lr-sweep.model.{COLLECTION}"}))
        assert not trigger.match.matches(Resource({"prefect.resource.id": "lr-sweep.sweep.s1"}))
        assert trigger.parameters == {name: f"{{{{ event.payload.{name} }}}}" for name in ("collection", "alias", "digest")}
        assert set(trigger.parameters) <= set(lr_sweep_export.parameters.properties)


# --- nothing in an event, a bundle or a model's metadata steers the export ------------------------

def test_a_planted_bundle_is_rebuilt_not_reused(tmp_path):
    """A bundle.json lists its files' SHA-256s, so a planted one "matched" and was reported as
    reused, with another model's weights in model.pt. Reuse now also needs the logits check."""
    registry = LocalRegistry(tmp_path / "registry")
    other = log(registry, 0.01, 1, aliases=("staging",))
    ref = log(registry, 0.001, 0, aliases=("production",))
    decoy = export_bundle(registry, COLLECTION, "staging", other.digest, tmp_path / "decoy")  # a real bundle of v0
    planted = tmp_path / "out" / bundle_name(ref)
    planted.parent.mkdir()
    (tmp_path / "decoy" / bundle_name(other)).rename(planted)
    claim = decoy | {"model": str(ref), "version": ref.version, "digest": ref.digest, "alias": "production"}
    (planted / "bundle.json").write_text(json.dumps({k: v for k, v in claim.items() if k not in ("path", "reused")}))

    bundle = export_bundle(registry, COLLECTION, "production", ref.digest, tmp_path / "out")
    assert bundle["reused"] is False and bundle["path"] == str(planted.resolve())
    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = eager(registry, ref)(images.contiguous(memory_format=torch.channels_last))
        scripted = torch.jit.load(str(planted / "model.pt"))(images)
    assert (scripted - expected).abs().max().item() <= 1e-5  # the promoted weights, not the decoy's
    again = export_bundle(registry, COLLECTION, "production", ref.digest, tmp_path / "out")
    assert again["reused"] is True and again["rechecked"]["max_abs_diff"] <= 1e-5


def test_a_promotion_in_another_registry_is_not_this_exports(tmp_path):
    """A Docker sweep's event reached the export of the host's registry: AliasNotFound or
    HolderChanged. A digest this registry does not hold is not this deployment's to export."""
    here, there = LocalRegistry(tmp_path / "here"), LocalRegistry(tmp_path / "there")
    log(here, 0.001, 0, aliases=("production",))
    elsewhere = log(there, 0.0005, 3, aliases=("production",))
    with pytest.raises(NotInThisRegistry, match="another registry"):
        export_bundle(here, COLLECTION, "production", elsewhere.digest, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_code_is_never_named_by_the_metadata(tmp_path):
    """The network is rebuilt by models/cnn.py from the architecture; metadata naming other code
    is refused without importing it."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_model.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    registry = LocalRegistry(tmp_path / "registry")
    stored = metadata(0.001, 0) | {"architecture": architecture(hidden_units=16) | {"name": "planted_model"},
                                   "model": {"module": "planted_model", "path": str(tmp_path / "planted_model.py")}}
    ref = registry.log_model(COLLECTION, build_model(architecture(hidden_units=16)).state_dict(), stored,
                             aliases=("production",))
    with pytest.raises(ExportError, match="cannot be rebuilt by this code"):
        export_bundle(registry, COLLECTION, "production", ref.digest, tmp_path / "out")
    assert not marker.exists() and "planted_model" not in sys.modules


def test_the_export_flow_opens_its_own_registry_not_the_events(prefect_server, tmp_path, monkeypatch):
    """The flow took `registry_dir` from the event: whatever directory a payload named was
    opened. Now the registry is the deployment's configuration (here LR_SWEEP_* of the worker)."""
    registry = LocalRegistry(tmp_path / "registry")
    ref = log(registry, 0.001, 0, aliases=("production",))
    monkeypatch.setenv("LR_SWEEP_REGISTRY_DIR", str(tmp_path / "registry"))
    monkeypatch.setenv("LR_SWEEP_OUTPUT_DIR", str(tmp_path / "runs"))
    bundle = lr_sweep_export(collection=COLLECTION, alias="production", digest=ref.digest)
    assert bundle["exported"] and Path(bundle["path"]).parent == (tmp_path / "runs" / "exports").resolve()
    other = log(LocalRegistry(tmp_path / "other"), 0.0005, 1, aliases=("production",))
    skipped = lr_sweep_export(collection=COLLECTION, alias="production", digest=other.digest)
    assert skipped == {"exported": False, "reason": skipped["reason"]} and "another registry" in skipped["reason"]


def test_the_export_flow_reads_a_wandb_registry(prefect_server, tmp_path, monkeypatch):
    """With registry 'wandb' the export fetched from the local directory the event named:
    AliasNotFound. It now resolves and downloads the alias from W&B (its server faked here:
    offline W&B has no artifacts to fetch)."""
    import wandb

    from models.serialization import model_files
    from models.wandb_registry import DIGEST_KEY
    from tests.wandb_fakes import FakeServer, digest_of

    server = FakeServer(collection=COLLECTION)
    torch.manual_seed(0)
    files = model_files(build_model(architecture(hidden_units=16)).state_dict(), metadata(0.001, 0))
    server.add(files, json.loads(files["metadata.json"]) | {DIGEST_KEY: digest_of(files)}, ["production"])
    monkeypatch.setattr(wandb, "Api", lambda *args, **kwargs: server.api)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    bundle = lr_sweep_export(collection=COLLECTION, alias="production", digest=digest_of(files), registry="wandb",
                             wandb_project="proj", wandb_entity="ent", output_dir=str(tmp_path / "out"))
    assert bundle["exported"] and bundle["digest"] == digest_of(files) and bundle["model"] == f"{COLLECTION}:v0"


def test_models_with_per_channel_constants_are_exported(tmp_path):
    """What a sweep stores now: mean and std as one value per channel. Grey models give the bundle
    the floats every bundle had; an RGB model's are normalised channel by channel."""
    registry = LocalRegistry(tmp_path / "registry")
    grey = metadata(0.001, 0)
    grey["dataset"] |= {"mean": [MEAN], "std": [STD]}
    torch.manual_seed(0)
    ref = registry.log_model(COLLECTION, build_model(architecture(hidden_units=16)).state_dict(), grey, aliases=("production",))
    bundle = export_bundle(registry, COLLECTION, "production", ref.digest, tmp_path / "grey")
    assert (bundle["input"]["mean"], bundle["input"]["std"]) == (MEAN, STD)

    rgb = metadata(0.001, 0) | {"architecture": architecture(hidden_units=16, in_channels=3, image_size=8, num_classes=3)}
    rgb["dataset"] |= {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    arch = rgb["architecture"]
    ref = registry.log_model("pets-cnn", build_model(arch).state_dict(), rgb, aliases=("production",))
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    bundle = export_bundle(registry, "pets-cnn", "production", ref.digest, tmp_path / "rgb", sample_images=images)
    assert bundle["input"]["mean"] == [0.5, 0.4, 0.3] and bundle["verification"]["max_abs_diff"] <= 1e-5
    card = (Path(bundle["path"]) / "model_card.md").read_text()
    assert "torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)" in card and "channel by channel" in card
