"""Options from JSON (API, --options files) are type-checked and validated with plain messages."""

from __future__ import annotations

import pytest

from dreamartist_ext.config import ConfigError, TrainConfig


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": "3"}, "'steps' must be a whole number"),
        ({"flip": 1}, "'flip' must be true or false"),
        ({"steps": True}, "'steps' must be a whole number"),
        ({"guidance": 3}, "'guidance' must be text"),
        ({"stepz": 3}, "unknown option"),
        ({"preview": {"stepz": 1}}, "unknown preview option"),
        ({"preview": 5}, "'preview' must be an object"),
        ({"adam_betas": 0.9}, "adam_betas"),
        ({"adam_betas": [0.9, 1.5]}, "adam_betas"),
        ({"adam_betas": [0.9]}, "adam_betas"),
        ({"tag_dropout": 2.0}, "tag dropout"),
        ({"latent_sampling": "sometimes"}, "latent sampling"),
        ({"width": 100}, "multiple of 8"),
        ({"name": "bad/name"}, "'/'"),
    ],
)
def test_bad_options_are_refused_with_a_message(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({"name": "cube", **values}).validate()


def test_round_trip_and_int_for_float():
    config = TrainConfig.from_dict({"name": "cube", "reconstruction_weight": 2, "preview": {"steps": 3}})
    assert config.reconstruction_weight == 2.0 and isinstance(config.reconstruction_weight, float)
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config and again.validate() is again
