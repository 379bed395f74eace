"""sd-workbench core: config schema, model zoo, pipeline loading and generation, shapes data."""

__version__ = "0.1.0"
