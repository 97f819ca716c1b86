"""Flax linen models. `build_model(config)` picks one by `config.model.name`."""
