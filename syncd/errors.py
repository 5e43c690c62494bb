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


class StoreRejected(StoreUnavailable):
    """The event store refused a value (too long, say) it cannot hold: not an outage."""


class SchemaMismatch(SyncdError):
    """The database schema does not match this version of syncd."""


class DeliveryError(SyncdError):
    """The ERP did not accept a delivery."""

    #: The longest response-body excerpt an error carries (and so may put in a dead letter).
    BODY_EXCERPT_CHARS = 500

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        self.status = status
        self.body = body[: self.BODY_EXCERPT_CHARS]
        super().__init__(message)


class TransientDeliveryError(DeliveryError):
    """The ERP failed in a way worth retrying.

    ``uncertain``: the ERP may have received the request and may still apply it (a timeout, a
    connection lost after the request was sent, a 504), so a newer state must not be sent
    straight after it, or the old one could land last.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str = "",
        retry_after: float | None = None,
        uncertain: bool = False,
    ) -> None:
        # A Retry-After in the past (clock skew) means "now", never a negative delay.
        self.retry_after = None if retry_after is None else max(0.0, retry_after)
        self.uncertain = uncertain
        super().__init__(message, status=status, body=body)


class PermanentDeliveryError(DeliveryError):
    """The ERP refused a delivery; retrying will not help."""
