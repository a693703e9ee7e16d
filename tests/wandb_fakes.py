"""A W&B server for one collection, served through autospec'd objects of the real SDK classes:
what the W&B backend and publish tests talk to instead of a network."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
import wandb
from wandb import Api  # the real class, whatever a test later puts at wandb.Api
from wandb.apis.public.service_api import ServiceApi
from wandb.errors import CommError

from models.cnn import architecture, build_model
from models.registry import ModelRef
from models.serialization import manifest_digest, model_files, sha256_hex
from models.wandb_registry import DIGEST_KEY

COLLECTION = "fashion-mnist-cnn"
PATH = f"ent/proj/{COLLECTION}"


def small_model(seed: int):
    torch.manual_seed(seed)
    arch = architecture(hidden_units=8)
    return build_model(arch).state_dict(), {"architecture": arch, "seed": seed, "trial_key": f"key-{seed}"}


def digest_of(files: dict[str, bytes]) -> str:
    return manifest_digest({name: sha256_hex(data) for name, data in files.items()})


class FakeServer:
    """What a W&B server keeps for one collection, served through autospec'd SDK objects."""

    def __init__(self, moves_aliases: bool = True, collection: str = COLLECTION):
        self.collection = collection
        self.versions: list[dict] = []  # {"files", "metadata", "aliases"}
        # A real server takes an alias from its holder when another version gets it; the other
        # mode checks that the backend clears the old holder itself when a server does not.
        self.moves_aliases = moves_aliases
        self.api = mock.create_autospec(Api, instance=True)
        self.api.artifact.side_effect = self.artifact
        self.api.artifact_collection_exists.side_effect = lambda name, type: bool(self.versions)
        self.api.artifacts.side_effect = lambda type_name, name, **_: [
            self._view(n) for n in range(len(self.versions))]

    def add(self, files: dict[str, bytes], metadata: dict, aliases=()) -> str:
        self.versions.append({"files": files, "metadata": metadata, "aliases": []})
        self._give(len(self.versions) - 1, ["latest", *aliases])
        return f"v{len(self.versions) - 1}"

    def add_model(self, seed: int, aliases=()) -> ModelRef:
        files = model_files(*small_model(seed))
        digest = digest_of(files)
        version = self.add(files, json.loads(files["metadata.json"]) | {DIGEST_KEY: digest}, aliases)
        return ModelRef(collection=self.collection, version=version, digest=digest)

    def _give(self, number: int, aliases) -> None:
        for alias in aliases:
            if self.moves_aliases or alias == "latest":
                for other in self.versions:
                    if alias in other["aliases"]:
                        other["aliases"].remove(alias)
            if alias not in self.versions[number]["aliases"]:
                self.versions[number]["aliases"].append(alias)

    def holders(self, alias: str) -> list[str]:
        return [f"v{n}" for n, v in enumerate(self.versions) if alias in v["aliases"]]

    def artifact(self, name: str, type: str | None = None):
        collection_path, _, tag = name.rpartition(":")
        assert collection_path == f"ent/proj/{self.collection}" and type == "model"
        for number, stored in enumerate(self.versions):
            if tag == f"v{number}" or tag in stored["aliases"]:
                return self._view(number)
        raise CommError(f"artifact membership '{self.collection}:{tag}' not found in 'ent/proj'")

    def _view(self, number: int):
        """A fresh client-side Artifact of version `number`, as the API returns one."""
        stored = self.versions[number]
        artifact = mock.create_autospec(wandb.Artifact, instance=True)
        artifact.version = f"v{number}"
        artifact.aliases = list(stored["aliases"])
        artifact.metadata = dict(stored["metadata"])
        artifact.created_at = f"2026-01-01T00:00:{number:02d}Z"
        saved_aliases = list(stored["aliases"])

        def save(project=None, settings=None):
            removed = [a for a in saved_aliases if a not in artifact.aliases]
            stored["aliases"] = [a for a in stored["aliases"] if a not in removed]
            self._give(number, [a for a in artifact.aliases if a not in saved_aliases])
            stored["metadata"] = dict(artifact.metadata)

        def download(root=None, allow_missing_references=False, skip_cache=None, path_prefix=None,
                     multipart=None):
            for file_name, data in stored["files"].items():
                (Path(root) / file_name).write_bytes(data)
            return root

        artifact.save.side_effect = save
        artifact.download.side_effect = download
        return artifact




class FakeReportServer:
    """W&B's side of saving a report (the project lookup and `upsertView`), behind an autospec'd
    `wandb.Api` whose GraphQL goes through an autospec'd `ServiceApi`, as in wandb 0.31. It keeps
    every upsert, so a test reads back the spec the real wandb-workspaces classes produced."""

    APP_URL = "https://wandb.example"

    def __init__(self, entity: str = "ent", projects=("proj",)):
        self.projects = list(projects)
        self.upserts: list[dict] = []  # the variables of each upsertView, spec parsed
        self.api = mock.create_autospec(Api, instance=True)
        self.api.default_entity = entity
        self.api.projects.side_effect = lambda entity=None, per_page=200: [
            SimpleNamespace(name=name) for name in self.projects]
        self.api.create_project.side_effect = lambda name, entity: self.projects.append(name)
        service = mock.create_autospec(ServiceApi, instance=True)
        service.app_url = self.APP_URL
        service.execute_graphql.side_effect = self.execute_graphql
        self.api._service_api = service  # where wandb-workspaces looks for the transport

    def execute_graphql(self, query: str, variables=None, timeout=None, **_):
        if "ProjectInternalId" in query:
            known = variables["projectName"] in self.projects
            return {"project": {"id": "UHJvamVjdDox", "internalId": "internal-1"} if known else None}
        assert "upsertView" in query, query
        view_id = variables["id"] or f"VmlldzoxMjM0NT{len(self.upserts)}"
        self.upserts.append(variables | {"id": view_id, "spec": json.loads(variables["spec"])})
        view = {"id": view_id, "type": variables["type"], "name": variables["name"],
                "displayName": variables["displayName"], "description": variables["description"],
                "project": {"id": "UHJvamVjdDox", "name": variables["projectName"],
                            "entityName": variables["entityName"]},
                "spec": variables["spec"], "updatedAt": "2026-11-29T00:00:00"}
        return {"upsertView": {"view": view, "inserted": variables["id"] is None}}
