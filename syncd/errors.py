"""The exceptions syncd raises; each class docstring is its default message."""

from __future__ import annotations


class SyncdError(Exception):
    """syncd failed."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(SyncdError):
    """The configuration is invalid."""

    exit_code = 2

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class StoreUnavailable(SyncdError):
    """The event store is unavailable."""


class SchemaMismatch(SyncdError):
    """The database schema does not match this version of syncd."""
