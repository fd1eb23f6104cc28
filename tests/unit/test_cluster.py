"""The shipped cluster definitions parse with the tools that will read them."""

import yaml

from tests.conftest import REPO


def test_ray_cluster_definition_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = prepare_config(yaml.safe_load((REPO / "cluster/ray-aws.yaml").read_text()))
    validate_config(config)  # raises on an unknown key or a wrong type
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_hostfiles_parse_with_deepspeeds_own_reader():
    from deepspeed.launcher.runner import fetch_hostfile
    assert dict(fetch_hostfile(str(REPO / "cluster/hosts"))) == {"localhost": 2}
    nodes = fetch_hostfile(str(REPO / "cluster/hosts.multinode.example"))
    assert len(nodes) == 8 and set(nodes.values()) == {8}
