"""TAPO stages, one file each. REGISTRY maps a stage name to `module:Class` for `tapo stage`."""

REGISTRY: dict[str, str] = {}
