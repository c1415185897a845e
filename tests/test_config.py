"""The config glue every job goes through."""

import pytest
from omegaconf import OmegaConf

from icl_scale.config import to_dict


def test_to_dict_resolves_nested_dictconfigs_into_plain_dicts():
    cfg = OmegaConf.create({"store": {"root": "${root}"}, "root": "/s", "levels": [0, 50]})
    d = to_dict(cfg)
    assert d == {"store": {"root": "/s"}, "root": "/s", "levels": [0, 50]}
    assert type(d["store"]) is dict and type(d["levels"]) is list  # noqa: E721 - exact types matter here
    plain = {"a": {"b": 1}}
    assert to_dict(plain) == plain and to_dict(plain) is not plain
    with pytest.raises(TypeError, match="must be a mapping"):
        to_dict(["not", "a", "config"])
