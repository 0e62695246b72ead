"""avatarcli: speech + one portrait -> a verified talking-avatar video."""

__version__ = "0.1.0"
