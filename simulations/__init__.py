# FederationConfig's defaults as the Hydra config federation/fields, before any job composes its config.
from simulations import config_store as _config_store  # noqa: F401
