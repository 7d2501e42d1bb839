"""deploy/: the `ray up` cluster configs and the `serve deploy` config pass Ray's own checks.

The cluster configs go through what `ray up` runs before it touches a cloud (prepare_config,
then validate_config against ray-schema.json); the Serve config through ServeDeploySchema and
the builder call `serve deploy` makes. No network, no Ray instance.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from medimesh.data import heart

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(doc, dict)
    return doc


def _prepared(doc: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before contacting the provider: fill defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config: dict[str, Any] = prepare_config(copy.deepcopy(doc))
    validate_config(config)
    return config


def _commands(config: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        out += config.get(key, [])
    for node in config.get("available_node_types", {}).values():
        out += node.get("worker_setup_commands", []) + node.get("initialization_commands", [])
    return out


def test_cluster_yaml_passes_ray_up_validation() -> None:
    """prepare_config + validate_config (ray-schema.json) accept deploy/cluster.yaml."""
    config = _prepared(_load("cluster.yaml"))
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] == "head"


def test_each_hospital_has_its_own_pinned_node_type() -> None:
    """One node type per heart center advertising hospital:<center>; the head advertises none."""
    config = _prepared(_load("cluster.yaml"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("medimesh:head") == 1
    assert not any(k.startswith("hospital:") for k in head["resources"])
    for center in heart.CENTERS:
        node = types[f"hospital_{center}"]
        custom = {k: v for k, v in node["resources"].items() if k.startswith("hospital:")}
        assert custom == {f"hospital:{center}": 1}
        assert node["min_workers"] == node["max_workers"] == 1
        setup = " ".join(node["worker_setup_commands"])
        assert "medimesh-*.whl" in setup and "MEDIMESH_HEART_DIR=/data/medimesh/heart" in setup
        assert heart.FILES[center] in setup  # checks for its own file, by the loader's name
        others = [heart.FILES[c] for c in heart.CENTERS if c != center]
        assert not any(f in setup for f in others)
    assert sum(n.get("min_workers", 0) for n in types.values()) <= config["max_workers"]


def test_cluster_configs_keep_secrets_and_the_dashboard_private() -> None:
    """No key file is mounted on every node; the dashboard listens on loopback only."""
    for name in ("cluster.yaml", "cluster-onprem.yaml"):
        config = _prepared(_load(name))
        mounts = " ".join(f"{k} {v}" for k, v in config["file_mounts"].items())
        assert ".key" not in mounts and "keys" not in mounts and ".medimesh" not in mounts
        starts = " ".join(config["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in starts
        # Every node's metrics agent on a known port (the dashboard lists them for Prometheus).
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            start = [c for c in config[key] if "ray start" in c]
            assert start and all("--metrics-export-port=8266" in c for c in start), key
        assert any("medimesh-*.whl" in c for c in _commands(config))


def test_onprem_yaml_passes_ray_up_validation() -> None:
    """The local-provider variant validates and gives every hospital server a worker slot."""
    raw = _load("cluster-onprem.yaml")
    config = _prepared(raw)
    assert config["provider"]["type"] == "local"
    assert len(raw["provider"]["worker_ips"]) == len(heart.CENTERS)
    assert "/etc/medimesh/ray-resources.json" in " ".join(config["worker_start_ray_commands"])


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["available_node_types"]["hospital_va"]["resources"].update(
            {"hospital:va": 0.5}
        ),
        lambda c: c["available_node_types"]["hospital_va"].update({"labelz": {}}),
        lambda c: c.update({"head_node_type": "nope"}),
    ],
)
def test_validation_catches_a_broken_cluster_config(breakage: Any) -> None:
    """The same check refuses a fractional resource, an unknown field, a missing head type."""
    doc = _load("cluster.yaml")
    breakage(doc)
    with pytest.raises(Exception) as err:
        _prepared(doc)
    assert type(err.value).__name__ in ("ValidationError", "ValueError", "KeyError")


def test_serve_yaml_validates_and_builds_the_oracle_app() -> None:
    """ServeDeploySchema accepts deploy/serve.yaml; its import path builds an Application."""
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    doc = _load("serve.yaml")
    schema = ServeDeploySchema.model_validate(doc)
    (app_cfg,) = schema.applications
    assert app_cfg.import_path == "medimesh.actors.oracle:app_builder"
    builder = import_attr(app_cfg.import_path)
    app = call_user_app_builder_with_args_if_necessary(builder, app_cfg.args)
    assert isinstance(app, Application)
    deployment_names = {d.name for d in app_cfg.deployments}
    from medimesh.actors.oracle import oracle_deployment

    assert deployment_names == {oracle_deployment().name}
    bad = copy.deepcopy(doc)
    bad["applications"][0]["deployments"][0]["num_replicas"] = "many"
    with pytest.raises(Exception, match="num_replicas"):
        ServeDeploySchema.model_validate(bad)
