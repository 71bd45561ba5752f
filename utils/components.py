"""Components by import path: a config value `{_component_: package.module.factory, **kwargs}`.

The convention of torchtune (`_component_`) and Hydra (`_target_`): a role of the run (a DiT role,
the text encoder, the VAE/codec) names a factory by its dotted import path, and the other keys of
the mapping are the factory's keyword arguments. The core then needs no branch for a user's own
teacher, codec or text table: it imports what the config names. What each role's object must do
is checked where the role is built (`model/build.py`); here a path that does not import, or
keyword arguments the factory does not take, is one `ConfigError` naming the config key.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from utils.errors import ConfigError

COMPONENT_KEY = "_component_"


def is_component(value: Any) -> bool:
    """A mapping with a `_component_` entry (an OmegaConf node or a plain dict)."""
    return isinstance(value, Mapping) and COMPONENT_KEY in value


def resolve(key: str, spec: Mapping[str, Any]) -> Callable[..., Any]:
    """The factory `spec[_component_]` names, with `spec`'s other entries checked against its signature."""
    path = spec[COMPONENT_KEY]
    where = f"{key}.{COMPONENT_KEY}={path!r}"
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ConfigError(f"{where}: expected a dotted import path such as 'package.module.factory'")
    factory = _import(where, path)
    if not callable(factory):
        raise ConfigError(f"{where}: a {type(factory).__name__}, not a class or function")
    kwargs = arguments(spec)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{key}: {path}(**{kwargs}) does not fit its signature: {err}") from err
    except ValueError:  # a builtin without a signature: let the call itself decide
        pass
    return factory


def _import(where: str, path: str) -> Any:
    """The object at `path`: the longest prefix that is a module, then attributes (`pkg.mod.Class.method`)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                continue  # this prefix is not a module: try a shorter one
            raise ConfigError(f"{where}: module {module_name!r} does not import ({err})") from err
        except ImportError as err:
            raise ConfigError(f"{where}: module {module_name!r} does not import ({err})") from err
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise ConfigError(f"{where}: {getattr(obj, '__name__', module_name)!r} has no {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ConfigError(f"{where}: module {parts[0]!r} does not import (no module of that name)")


def arguments(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The factory's keyword arguments: every entry but `_component_`."""
    return {k: v for k, v in spec.items() if k != COMPONENT_KEY}


def instantiate(key: str, spec: Mapping[str, Any]) -> Any:
    """Call the factory `spec` names with its keyword arguments."""
    return resolve(key, spec)(**arguments(spec))
