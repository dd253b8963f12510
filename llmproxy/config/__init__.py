"""Load the YAML configuration into the dataclasses of `llmproxy.config.model`, validating every key.

Validation is strict on purpose: an unknown key, a wrong type or an out-of-range value stops the proxy with a
message naming the key path (`backends[1].weight: must be a positive integer, got "abc"`). A silently ignored
typo in a timeout, or a silently ignored `auth:` section, is worse than refusing to start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from llmproxy.config.access import access_warnings, check_access, load_credentials_file, load_keys_file
from llmproxy.config.caching import check_caching
from llmproxy.config.discovery import check_discovery_files
from llmproxy.config.dump import dump_config
from llmproxy.config.model import Config
from llmproxy.config.routes import check_routes
from llmproxy.config.sections import _TOP_LEVEL_FIELDS
from llmproxy.config.values import (
    ConfigError,
    _parse_fields,
    _show,
    expand_env,
    parse_duration,
    parse_listen,
    parse_size,
)

# ---------------------------------------------------------------------------------------------------------
# Loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML otherwise resolves silently (last one wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        # Only this node's own keys: keys brought in by a `<<:` merge may legitimately be overridden.
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_show(key)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a YAML config file."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(name, "file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(name, "not valid UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(name, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(name, f"invalid YAML: {_describe_yaml_error(exc)}") from None
    return parse_config(data, source=name, base_dir=Path(name).parent)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(exc)


def parse_config(data: dict[str, Any] | None, *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate an already-parsed YAML document. `source` names the document in document-level errors;
    `base_dir` is where relative auth.keys_file paths start (default: the working directory)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, f"must be a mapping of sections (server, backends, ...), got {_show(data)}")
    values = _parse_fields(data, "", _TOP_LEVEL_FIELDS)
    if "backends" not in values:
        raise ConfigError("backends", "at least one backend is required")
    config = Config(**values)
    check_routes(config)
    check_caching(config)
    load_keys_file(config, base_dir or Path.cwd())
    load_credentials_file(config, base_dir or Path.cwd())
    check_discovery_files(config, base_dir or Path.cwd())
    check_access(config)
    return config




def config_warnings(config: Config) -> list[str]:
    """Valid settings that are almost certainly a mistake, one line each, naming the key."""
    return access_warnings(config)


__all__ = ["ConfigError", "config_warnings", "dump_config", "expand_env", "load_config", "parse_config",
           "parse_duration", "parse_listen", "parse_size"]
