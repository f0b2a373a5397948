"""Reading configuration and definition files: every failure becomes a one-line ConfigError."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from reaper.errors import ConfigError


def read_text(path: Path, what: str = "file") -> str:
    """Read a UTF-8 text file, turning every failure into a one-line ConfigError. A leading byte order mark (what
    Windows editors write) is dropped: TOML's parser refused it as "Invalid statement (at line 1, column 1)"."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, expected a {what}"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except UnicodeDecodeError as e:
        if e.object.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise ConfigError([f"{path}: UTF-16 text (a Windows editor's \"Unicode\"); save the file as UTF-8"]) \
                from None
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError([f"{path}: not UTF-8 text: line {line} has the byte 0x{e.object[e.start]:02x} ({e.reason}); "
                           "save the file as UTF-8"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning every failure into a one-line ConfigError."""
    text = read_text(path, "TOML file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: invalid TOML: {e}"]) from None
