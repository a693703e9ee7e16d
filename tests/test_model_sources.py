"""Your model: sweeps of a user model file and of torchvision's resnet18, and the trust rules of
models/sources.py (user code is imported only when the command names it, and never when its
code digest is not the one the model was trained with)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from flows.config import SweepConfig
from flows.plan import collection_name
from flows.preflight import check_model_code
from models.errors import InputError
from models.local_registry import LocalRegistry
from models.sources import GreyToRGB, InputShape, ModelCodeChanged, ModelSource, check_source, rebuild
from models.user_code import SourceError
from tasks.data.prepare import load_splits, prepare_dataset
from tasks.export import ExportError, export_bundle
from tasks.training.train import train_trial
from tests.helpers import CLASSES, smoke_config, trial_spec, write_folder

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "resnet_model.py"
GREY = InputShape(in_channels=1, image_size=28, num_classes=10)


DATA_FUNCTION = """
import torch


def pictures():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(72) % 3
    images = torch.randint(0, 50, (72, 3, 12, 12), dtype=torch.uint8, generator=generator)
    for index, label in enumerate(labels.tolist()):
        images[index, :, 4 * label:4 * label + 4] = 240
    return images[:60], labels[:60], images[60:], labels[60:], ("top", "middle", "bottom")
"""


def sweep(prefect_server, tmp_path, **fields):
    from flows.sweep import lr_sweep

    config = SweepConfig(learning_rates=[0.01, 0.001], epochs=1, batch_size=16, device="cpu",
                         data_dir=tmp_path / "data", output_dir=tmp_path / "runs",
                         registry_dir=tmp_path / "registry", **fields)
    return config, lr_sweep(config=config)


@pytest.fixture(scope="module")
def user_sweep(prefect_server, tmp_path_factory):
    """The example's small ResNet (BatchNorm), copied into a folder called `models/` as a user's
    project would have it, on a user's RGB image folder."""
    tmp_path = tmp_path_factory.mktemp("user-model")
    model_file = tmp_path / "project" / "models" / "resnet_model.py"
    model_file.parent.mkdir(parents=True)
    shutil.copy(EXAMPLE, model_file)
    folder = write_folder(tmp_path / "my-pictures", {"train": 20, "test": 6})
    config, summary = sweep(prefect_server, tmp_path, model=f"{model_file}:small_resnet", model_args={"width": 4},
                            dataset=f"imagefolder:{folder}")
    return config, summary, model_file


def assert_swept_evaluated_promoted_and_exported(config, summary, collection, allowed):
    """Every trial trained and was evaluated on the model fetched by its digest; the alias holds
    the best; the export rebuilds it (from the config's own model source) and its files give the
    stored weights' logits."""
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed"]
    assert all(t["model"].startswith(f"{collection}:v") for t in summary["trials"])
    for trial in summary["trials"]:
        assert trial["evaluation"]["val_accuracy"] == trial["history"][-1]["val_accuracy"]
    registry = LocalRegistry(config.registry_dir)
    holder = registry.resolve(collection, "production")
    assert holder is not None and str(holder) == summary["best"]["model"]
    bundle = export_bundle(registry, collection, "production", holder.digest, config.output_dir / "exports",
                           allowed=allowed)
    assert bundle["digest"] == holder.digest and bundle["verification"]["max_abs_diff"] <= 1e-5
    assert {"model.pt2", "model_card.md"} <= set(bundle["files"])
    return registry.fetch(holder)


def test_a_user_model_file_on_a_user_image_folder_is_swept_promoted_and_exported(user_sweep):
    config, summary, _ = user_sweep
    stored = assert_swept_evaluated_promoted_and_exported(config, summary, "my-pictures-small_resnet",
                                                          ModelSource(config.model, config.model_args))
    record = stored.metadata["model_source"]
    assert record["spec"] == config.model and record["args"] == {"width": 4} and record["kind"] == "user"
    assert record["code_digest"].startswith("sha256:") and record["shape"] == {"in_channels": 3, "image_size": 8,
                                                                                "num_classes": 3}
    assert stored.metadata["dataset"]["class_names"] == list(CLASSES)


def test_torchvision_resnet18_on_a_dataset_function_is_swept_promoted_and_exported(prefect_server, tmp_path):
    functions = tmp_path / "user" / "pictures.py"
    functions.parent.mkdir()
    functions.write_text(DATA_FUNCTION)
    config, summary = sweep(prefect_server, tmp_path, model="torchvision:resnet18", dataset=f"{functions}:pictures",
                            val_size=12)
    collection = collection_name(config)
    assert collection.startswith("pictures") and collection.endswith("-resnet18")
    stored = assert_swept_evaluated_promoted_and_exported(config, summary, collection, None)
    assert stored.metadata["model_source"]["code_digest"].startswith("torchvision==")


def test_the_export_of_a_user_model_needs_its_own_configuration_to_name_it(user_sweep, tmp_path):
    config, summary, _ = user_sweep
    holder = LocalRegistry(config.registry_dir).resolve("my-pictures-small_resnet", "production")
    with pytest.raises(ExportError, match="imports user code only when the command's own config names it"):
        export_bundle(LocalRegistry(config.registry_dir), holder.collection, "production", holder.digest,
                      tmp_path / "exports")
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


def test_a_user_file_under_models_does_not_shadow_our_models_package(user_sweep):
    import models

    assert Path(models.__file__).resolve().parent == REPO_ROOT / "models"
    loaded = [name for name in sys.modules if name.startswith("lr_sweep_user.resnet_model")]
    assert loaded and all(not name.startswith("models.resnet") for name in sys.modules)


def test_a_registry_entry_never_makes_lr_sweep_import_user_code(user_sweep):
    config, summary, _ = user_sweep
    stored = LocalRegistry(config.registry_dir).fetch(summary["best"]["model"])
    with pytest.raises(ModelCodeChanged, match="imports user code only when the command's own config names it"):
        rebuild(stored.metadata, None)
    with pytest.raises(ModelCodeChanged, match="names --model torchvision:resnet18|names no user model"):
        rebuild(stored.metadata, ModelSource("torchvision:resnet18"))
    network = rebuild(stored.metadata, ModelSource(config.model, config.model_args))
    network.load_state_dict(stored.state_dict)  # the same layout, weights and all


def test_a_changed_model_file_is_refused_naming_both_digests(user_sweep):
    config, summary, model_file = user_sweep
    stored = LocalRegistry(config.registry_dir).fetch(summary["best"]["model"])
    recorded = stored.metadata["model_source"]["code_digest"]
    original = model_file.read_text()
    try:
        model_file.write_text(original + "\n# tuned after training\n")
        ModelSource(config.model).refresh()  # as a new command would import it
        with pytest.raises(ModelCodeChanged) as caught:
            rebuild(stored.metadata, ModelSource(config.model, config.model_args), name=summary["best"]["model"])
        message = str(caught.value)
        assert recorded in message and "the model code changed since" in message
        assert ModelSource(config.model).digest() in message
    finally:
        model_file.write_text(original)
        ModelSource(config.model).refresh()


def test_torchvision_resnet18_trains_on_grey_images(synthetic_data_dir):
    dataset = prepare_dataset("mnist", synthetic_data_dir, 100, 0, 64, allow_download=False)
    spec = trial_spec(model="torchvision:resnet18", epochs=1, batch_size=32)
    result = train_trial(spec, load_splits(dataset, "cpu"), "cpu")
    assert len(result.history) == 1 and result.history[0]["train_loss"] > 0
    network = ModelSource("torchvision:resnet18").build(GREY)
    assert isinstance(network, GreyToRGB) and network.network.fc.out_features == 10
    assert ModelSource("torchvision:resnet18").digest().startswith("torchvision==")


@pytest.mark.parametrize(("spec", "args", "field", "fragment"), [
    ("nosuchpackage.module:build", {}, "model", "no module named 'nosuchpackage'"),
    ("missing/file.py:build", {}, "model", "does not exist"),
    ("{example}:BasicBlock_typo", {}, "model", "has no 'BasicBlock_typo'"),
    ("torchvision:resnet999", {}, "model", "is not a classification model of torchvision"),
    ("{example}:small_resnet", {"depth": 3}, "model_args", "refused its arguments"),
])
def test_bad_model_sources_are_refused_naming_the_field(spec, args, field, fragment):
    source = ModelSource(spec.format(example=EXAMPLE), args)
    with pytest.raises(SourceError, match=fragment) as caught:
        check_source(source, GREY)
    assert caught.value.field == field


def test_a_factory_that_returns_no_module_or_wrong_logits_is_refused(tmp_path):
    factories = tmp_path / "factories.py"
    factories.write_text("import torch\n"
                         "def not_a_module(num_classes, in_channels, image_size):\n    return 3\n"
                         "def too_few_classes(num_classes, in_channels, image_size):\n"
                         "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes - 1))\n"
                         "value = 3\n")
    with pytest.raises(SourceError, match="not a torch.nn.Module"):
        check_source(ModelSource(f"{factories}:not_a_module"), GREY)
    with pytest.raises(SourceError, match=r"logits of shape \(2, 10\)"):
        check_source(ModelSource(f"{factories}:too_few_classes"), GREY)
    with pytest.raises(InputError, match="not a function"):
        check_model_code(smoke_config(tmp_path, tmp_path, model=f"{factories}:value"))


def test_checking_a_source_leaves_the_seeded_rng_where_it_was():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_source(ModelSource(f"{EXAMPLE}:small_resnet", {"width": 4}), GREY)
    assert torch.equal(torch.rand(3), expected)


def test_the_image_folder_recipe_runs_as_written_on_small_data(prefect_server, tmp_path, monkeypatch):
    """examples/imagefolder.toml, the recipe's preset, with a small folder of one's own; the
    folder is located and fingerprinted once, by the pre-flight, not again by the flow."""
    from flows.cli import main
    from tasks.data import imagefolder

    located = []
    monkeypatch.setattr(imagefolder, "prepare", lambda *args, real=imagefolder.prepare: located.append(args) or real(*args))
    folder = write_folder(tmp_path / "small-folder", {"train": 12, "test": 4}, channels=1)
    code = main(["run", "--config", str(REPO_ROOT / "examples" / "imagefolder.toml"), "--dataset", f"imagefolder:{folder}",
                 "--model", f"{EXAMPLE}:small_resnet", "--model-args", '{"width": 4}', "--epochs", "1",
                 "--learning-rates", "0.01", "--batch-size", "8", "--device", "cpu", "--data-dir", str(tmp_path / "data"),
                 "--output-dir", str(tmp_path / "runs"), "--registry-dir", str(tmp_path / "registry")])
    assert code == 0
    assert LocalRegistry(tmp_path / "registry").resolve("small-folder-small_resnet", "production") is not None
    assert len(located) == 1
