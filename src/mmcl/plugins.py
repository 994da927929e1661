"""Outside code: Python files named by ``mmcl run --plugin FILE`` and the entry points of the group
``mmcl.plugins`` of installed packages. Importing one is all it takes: it registers its methods,
streams, scorers or backbone presets with the same calls the built-ins use (``register_method``,
``register_stream``, ``register_scorer``, ``register_preset``).

A file is imported under a module name made from its content's SHA-256, so loading the same file
twice (a resumed run, every ``torchrun`` process) is one module and registers nothing twice, while
another file claiming a taken name is refused. :func:`load_plugins` returns what a run loaded (resolved
path and SHA-256 of each file) for its resolved config; :func:`loaded_plugins` lists every plugin of the process.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Sequence

from mmcl.errors import ConfigError, MmclError

ENTRY_POINT_GROUP = "mmcl.plugins"
MODULE_PREFIX = "mmcl_plugin_"

_loaded: dict[str, dict[str, str]] = {}  # resolved path -> {"path", "sha256"}, in load order


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failure(file: Path, exc: BaseException) -> ConfigError:
    """One line for an exception raised while ``file`` was imported, with the plugin's line if known."""
    if isinstance(exc, SyntaxError):
        where = Path(exc.filename).name if exc.filename and Path(exc.filename) != file else ""
        location = f"line {exc.lineno}" + (f" of {where}" if where else "")
        return ConfigError(f"{file}: {location}: invalid Python ({exc.msg})")
    if isinstance(exc, MmclError):  # e.g. a name another definition registered already
        return ConfigError(f"{file}: {_one_line(exc)}")
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if Path(frame.filename) == file]
    location = f" (line {lines[-1]})" if lines else ""
    message = _one_line(exc) or "no message"
    return ConfigError(f"{file}: the plugin raised {type(exc).__name__} while being imported{location}: {message}")


def _register_builtins() -> None:
    """Register the built-in methods, streams, scorers and presets first, so that a plugin taking one of
    their names is the one refused."""
    import mmcl.backbones.registry  # noqa: F401
    import mmcl.evaluation.scorers  # noqa: F401
    import mmcl.methods  # noqa: F401
    import mmcl.streams.registry  # noqa: F401


def load_plugin_file(path: str | Path) -> ModuleType:
    """Import the Python file ``path`` (once per content); a missing or unreadable file, a syntax error or
    an exception while importing it is a :class:`ConfigError` naming the file."""
    _register_builtins()
    file = Path(path).expanduser()
    try:
        file = file.resolve(strict=True)
        content = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--plugin {path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"--plugin {path}: cannot read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(content).hexdigest()
    name = MODULE_PREFIX + digest[:16]
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ConfigError(f"--plugin {path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except KeyboardInterrupt:
            sys.modules.pop(name, None)
            raise
        except BaseException as exc:  # noqa: BLE001  (SystemExit too: a plugin does not end the run)
            sys.modules.pop(name, None)
            raise _failure(file, exc) from None
    _loaded.setdefault(str(file), {"path": str(file), "sha256": digest})
    return module


def load_entry_points() -> list[str]:
    """Import the module of every ``mmcl.plugins`` entry point of the installed packages; returns the resolved
    paths of their source files."""
    _register_builtins()
    sources = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            message = exc if isinstance(exc, MmclError) else f"{type(exc).__name__}: {exc}"
            raise ConfigError(f"plugin entry point {entry.name} ({entry.value}): {_one_line(message)}") from None
        module = sys.modules.get(entry.module)
        source = getattr(module, "__file__", None)
        if source and Path(source).is_file():
            resolved = Path(source).resolve()
            digest = hashlib.sha256(resolved.read_bytes()).hexdigest()
            _loaded.setdefault(str(resolved), {"path": str(resolved), "sha256": digest})
            sources.append(str(resolved))
    return sources


def load_plugins(paths: Sequence[str | Path] = ()) -> list[dict[str, str]]:
    """The entry points, then the files ``paths`` in order (what ``mmcl run --plugin`` does). Returns what the
    run's ``config.plugins`` records: those plugins (path, SHA-256), the entry points not named in ``paths``
    first, then ``paths`` in order; not other plugins an earlier call in this process loaded."""
    entry_sources = load_entry_points()
    files = []
    for path in paths:
        load_plugin_file(path)
        files.append(str(Path(path).expanduser().resolve()))  # a copy of a loaded file is recorded under its own path
    ordered = [source for source in entry_sources if source not in files] + files
    return [dict(_loaded[source]) for source in dict.fromkeys(ordered)]


def loaded_plugins() -> list[dict[str, str]]:
    """Every plugin loaded in this process: ``{"path": resolved path, "sha256": of the file}``, in load order."""
    return [dict(entry) for entry in _loaded.values()]
