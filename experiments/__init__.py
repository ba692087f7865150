"""Experiments: models, data and the Hydra entry points that train them with GPipeStrategy."""
