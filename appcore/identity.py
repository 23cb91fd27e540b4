"""Who is making the current request: one place the auth layer writes and the project state reads.

The auth layer (``MONAI_LABEL_AUTH_ENABLE``) sets :data:`current_user` for each request from the
verified token; with auth off every request is :data:`ANONYMOUS`. Reservations, label authors,
review decisions and the audit log read it through :func:`user`, never from a free-form
``client_id`` parameter (which is kept only as the client's name, e.g. which viewer saved).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(frozen=True)
class User:
    """An authenticated (or anonymous) caller.

    Args:
        name: the token's ``preferred_username`` (else ``sub``); ``"anonymous"`` when auth is off.
        roles: MONAI Label role names from ``realm_access.roles`` (``monailabel-admin`` ...).
        client: the client's own name (``client_id`` parameter or the token's ``azp``), if any.
    """

    name: str
    roles: frozenset[str] = field(default_factory=frozenset)
    client: str | None = None


ANONYMOUS = User("anonymous")

current_user: ContextVar[User] = ContextVar("current_user", default=ANONYMOUS)


def user() -> User:
    """The caller of the request being served (``ANONYMOUS`` outside a request or with auth off)."""
    return current_user.get()
