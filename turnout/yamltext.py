"""YAML that people write (the proxy's bootstrap file; the control plane's policy, auth and
tokens files), parsed with PyYAML's safe loader so that every failure is one exception."""

from __future__ import annotations

from typing import Any

import yaml


class YamlError(ValueError):
    """Text that is no usable YAML; the message says why."""


def load_yaml_text(text: str) -> Any:
    """The document in ``text`` (None when it is empty); raises ``YamlError``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise YamlError(str(exc)) from None
    except RecursionError:
        raise YamlError("nested too deeply") from None
    except Exception as exc:
        # PyYAML's constructors let their own errors out: ValueError for a 30th of February
        # or an integer of more digits than Python converts, AttributeError for a malformed
        # !!timestamp, TypeError for some tags on the wrong node.
        raise YamlError(f"{type(exc).__name__}: {exc}") from None
