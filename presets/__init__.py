"""Built-in presets (YAML files), shipped inside the wheel as avatarcli.builtin_presets."""
