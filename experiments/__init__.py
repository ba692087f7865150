"""Experiments: models, data and the Hydra entry points that train them with GPipeStrategy.

Importing the package registers the configs' resolvers.
"""

from omegaconf import OmegaConf

# conf/trainer/*.yaml: devices: ${mul:${k},${dp}} (k stages times dp replicas)
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)
