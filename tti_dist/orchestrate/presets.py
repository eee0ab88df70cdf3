"""Model-size presets: the `model_size` axis of a sweep.

A preset sets the shape keys of `model` (layers, width, heads); everything else (vocabulary,
sequence length, regularizer sites, ...) comes from the sweep's base config. A sweep file can
add or replace presets under `presets:` with the same keys.

The ladder keeps the head dimension near 32 and grows depth and width together, as the
scaling-law papers do (Kaplan et al. 2020, "Scaling Laws for Neural Language Models"; the
non-embedding parameter count is about 12 * num_layers * hidden_size^2). Head counts are
multiples of 4 (2 for xs), so TP degrees 1, 2 and 4 divide them. The small end trains on a
CPU in seconds; the large end is a GPU run.
"""

from __future__ import annotations

from tti_dist.errors import ConfigError

MODEL_SIZE_AXIS = "model_size"
"""The axis key that selects a preset (the other axis keys are config keys)."""

PRESET_KEYS = ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size")
"""The model keys a preset may set."""

MODEL_SIZES: dict[str, dict[str, int]] = {
    "xs": {"num_layers": 1, "hidden_size": 32, "num_heads": 2},
    "s": {"num_layers": 2, "hidden_size": 64, "num_heads": 4},
    "m": {"num_layers": 3, "hidden_size": 96, "num_heads": 4},
    "l": {"num_layers": 4, "hidden_size": 128, "num_heads": 4},
    "xl": {"num_layers": 6, "hidden_size": 256, "num_heads": 8},
    "xxl": {"num_layers": 8, "hidden_size": 512, "num_heads": 16},
    "gpt2-small": {"num_layers": 12, "hidden_size": 768, "num_heads": 12},
}


def resolve_presets(extra: object, where: str = "presets") -> dict[str, dict[str, int]]:
    """The built-in presets updated with a sweep file's `presets:` mapping (checked)."""
    presets = {k: dict(v) for k, v in MODEL_SIZES.items()}
    if extra is None:
        return presets
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}: expected a mapping of preset name -> model keys, got {extra!r}")
    for name, keys in extra.items():
        if not isinstance(keys, dict) or not keys:
            raise ConfigError(f"{where}.{name}: expected a mapping of model keys ({', '.join(PRESET_KEYS)}), got {keys!r}")
        for key, value in keys.items():
            if key not in PRESET_KEYS:
                raise ConfigError(f"{where}.{name}.{key}: unknown preset key; allowed: {', '.join(PRESET_KEYS)}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}.{name}.{key}: {value!r} must be a positive integer")
        presets[str(name)] = dict(keys)
    return presets


def preset_overrides(name: object, presets: dict[str, dict[str, int]], where: str) -> list[str]:
    """`--set` overrides (model.<key>=<value>) of the preset `name`."""
    if not isinstance(name, str) or name not in presets:
        raise ConfigError(f"{where}: unknown model size {name!r}; known: {', '.join(presets)} "
                          "(add more under presets:)")
    return [f"model.{k}={v}" for k, v in presets[name].items()]
