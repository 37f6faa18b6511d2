"""Reading a configuration: the defaults of `bertxml.config`, then YAML files (`--conf`: a packaged name
or a path), then `--set section.key=value` pairs, each value coerced to its field's type with an error that
names the key; and the dict round trip that a saved config (a model folder, a report) goes through.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import yaml

from bertxml.config import CONF_DIR, Config, ConfigError


def _coerce(value, typ, key: str):
    """Turn a YAML or `--set` value into the field's declared type, or raise naming the key."""
    origin = typing.get_origin(typ) or typ
    if isinstance(typ, str):
        origin = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}[typ]
    try:
        if origin is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if origin is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if origin is float:
            return float(value)
        if origin is str:
            return str(value)
        if origin in (list, dict):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, origin):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: cannot use {value!r} as {origin.__name__}") from None
    return value


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """Apply a nested dict {section: {key: value}} onto cfg, in place; unknown names are errors."""
    for section, values in (overrides or {}).items():
        if section not in {f.name for f in dataclasses.fields(cfg)}:
            raise ConfigError(f"unknown config section {section!r}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        target = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown config key {section}.{key}")
            value = _coerce(value, fields[key].type, f"{section}.{key}")
            check = fields[key].metadata.get("check")
            if check is not None:
                try:
                    value = check(value)
                except ValueError as err:
                    raise ConfigError(f"config key {section}.{key}: {err}") from None
            setattr(target, key, value)
    return cfg


def parse_set(pairs: list[str]) -> dict:
    """['train.lr=1e-4', ...] -> {'train': {'lr': '1e-4'}}; YAML scalars are parsed later by type."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set expects section.key=value, got {pair!r}")
        out.setdefault(section, {})[name] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def packaged_configs() -> list[str]:
    """The names `--conf NAME` accepts: the YAML files shipped in bertxml/conf/."""
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def resolve_conf(spec: str | Path) -> Path:
    """A `--conf` value -> the YAML file it means.

    A bare name (no path separator, no .yaml/.yml suffix) is a config shipped in the package
    (`prod` -> bertxml/conf/prod.yaml); anything else is a path, relative to the working folder.
    """
    text = str(spec)
    if "/" in text or os.sep in text or text.endswith((".yaml", ".yml")):
        return Path(text)
    path = CONF_DIR / f"{text}.yaml"
    if not path.exists():
        raise ConfigError(f"no packaged config {text!r}; choose one of {packaged_configs()} "
                          f"or give a path to a .yaml file")
    return path


def model_preset(size: str) -> dict:
    """bertxml/conf/model/<size>.yaml as a dict of ModelConfig fields (paper Table 1 for small and big)."""
    path = CONF_DIR / "model" / f"{size}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"unknown model size {size!r}; choose one of {choices}")
    return load_yaml(path)


def load_config(conf_files: list[str] | None = None, sets: list[str] | None = None,
                size: str | None = None) -> Config:
    """Defaults, then each YAML file in order (a path or a packaged name, see `resolve_conf`), then a
    model size preset, then `--set` pairs."""
    cfg = Config()
    for spec in conf_files or []:
        data = load_yaml(resolve_conf(spec))
        preset = data.pop("model_size", None)
        if preset:
            apply_overrides(cfg, {"model": model_preset(preset)})
        apply_overrides(cfg, data)
    if size:
        apply_overrides(cfg, {"model": model_preset(size)})
    apply_overrides(cfg, parse_set(sets or []))
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with a model or report (to_dict output)."""
    return apply_overrides(Config(), data)
