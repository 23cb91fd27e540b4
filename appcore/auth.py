"""Who may call what: bearer tokens of an OpenID realm (Keycloak), roles, and one role table for every route.

With MONAI Label's ``MONAI_LABEL_AUTH_ENABLE`` on, every request but the public ones (the API
pages, ``/auth/`` and ``/auth/token``) must carry ``Authorization: Bearer <token>``: an RS256 JWT
signed by a key of the realm at ``MONAI_LABEL_AUTH_REALM_URI`` (its document's ``public_key``, or a
key of its OpenID configuration's JWKS, looked up by the token's ``kid``), unexpired, whose
``realm_access.roles`` (``MONAI_LABEL_AUTH_TOKEN_ROLES``) hold one of MONAI Label's role names. A
missing, malformed, forged, expired or wrongly signed token is a 401 (``WWW-Authenticate: Bearer``),
a role below the endpoint's is a 403 that names the role needed. MONAI Label's own check
(``from_token``) passes no ``algorithms`` to PyJWT 2, which then refuses every token.

Roles are ordered: admin > reviewer > annotator > user; a role grants everything below it.
``ROLE_TABLE`` gives each route of the server (method and path pattern) its least role; a test
walks the server's routes and fails on any the table does not cover. The check is an ASGI layer
(``AuthLayer``) in front of every route, so it holds for MONAI Label's routes, ours and the DICOMweb
proxy alike, before a request body is read. It sets ``appcore.identity.current_user`` for the
request (``ANONYMOUS`` with authentication off), which reservations, versions and labels read.

With authentication off the server must not listen on a non-loopback address unless
``--conf allow_anonymous true`` says that anonymous access is intended (``check_open_door``).
"""

from __future__ import annotations

import argparse
import base64
import enum
import functools
import ipaddress
import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from starlette.requests import Request

from appcore.errors import RequestError
from appcore.identity import ANONYMOUS, User, current_user

logger = logging.getLogger(__name__)

ALGORITHMS = ["RS256"]  # the only signature accepted: never read from the token
CLOCK_SKEW_S = 30  # seconds of clock difference allowed between the realm and this server
REFETCH_S = 30.0  # least seconds between two fetches of the realm's keys (unknown kid, realm down)
REALM = "monailabel"  # the realm named in WWW-Authenticate


class Role(enum.IntEnum):
    """What a route needs; each role grants every role below it."""

    PUBLIC = 0  # no token needed
    USER = 1  # reads: info, datastore, DICOMweb proxy
    ANNOTATOR = 2  # infer, next case, save labels, sessions
    REVIEWER = 3  # approve or reject labels
    ADMIN = 4  # train, weights, delete images and labels, scoring

    @property
    def setting(self) -> str:
        """The MONAI Label setting that names this role in tokens (``MONAI_LABEL_AUTH_ROLE_*``)."""
        return f"MONAI_LABEL_AUTH_ROLE_{self.name}"


@functools.cache
def role_names() -> dict[Role, str]:
    """Each role's name in tokens, as MONAI Label's settings give it (``monailabel-admin`` ...; read once)."""
    from monailabel.config import settings

    return {role: getattr(settings, role.setting) for role in Role if role is not Role.PUBLIC}


def auth_enabled() -> bool:
    """Whether MONAI Label's ``MONAI_LABEL_AUTH_ENABLE`` is on."""
    from monailabel.config import settings

    return bool(settings.MONAI_LABEL_AUTH_ENABLE)


# -- the role table -----------------------------------------------------------------------------------

P, U, AN, RV, AD = Role.PUBLIC, Role.USER, Role.ANNOTATOR, Role.REVIEWER, Role.ADMIN

# (methods, path pattern as Starlette writes it, least role). HEAD goes with GET. A request whose
# path several patterns match needs the highest of their roles, except that a catch-all pattern (a
# ``{...:path}`` parameter) gives way to the patterns without one that match the same method (the
# STOW rows below /proxy/dicom/); a path no pattern matches needs ADMIN, so a route added without a
# row here is closed, not open (and tests/appcore/test_auth.py fails).
ROLE_TABLE: tuple[tuple[str, str, Role], ...] = (
    # pages of the server itself: no data
    ("GET", "/", P),
    ("GET", "/docs", P),
    ("GET", "/openapi.json", P),
    ("GET", "/favicon.ico", P),
    ("GET", "/static/{path:path}", P),
    # OHIF's page, scripts, configuration and the labeling panel's code: files, no patient data.
    # They load without a token so that the page can show its login; every study it then shows comes
    # through the DICOMweb proxy, which needs a token (docs/ohif.md, "Authentication").
    ("GET", "/ohif/{path:path}", P),
    # login (3D Slicer asks /auth/ whether to show its login, then /auth/token; so does OHIF's page)
    ("GET", "/auth/", P),
    ("POST", "/auth/token", P),
    ("GET", "/auth/token/valid", U),
    # reads
    ("GET", "/info/", U),
    ("GET", "/model/info/{model}", AD),  # the model's files on the server
    ("GET", "/datastore/", U),
    ("GET", "/datastore/image", U),
    ("GET", "/datastore/image/info", U),
    ("GET", "/datastore/label", U),
    ("GET", "/datastore/label/info", U),
    ("GET", "/datastore/label/versions", U),  # label history (appcore.history_routes)
    ("GET", "/datastore/tombstones", U),
    ("GET", "/datastore/dataset", AN),  # every label at once, as MONAI Label asks
    ("GET", "/train/", U),
    ("GET", "/scoring/", U),
    ("GET", "/batch/infer", U),
    ("GET", "/proxy/dicom/{path:path}", U),
    ("GET", "/labeling/status", U),  # the OHIF labeling panel's progress and models
    # annotating
    ("POST", "/infer/{model}", AN),
    ("POST", "/infer/wsi/{model}", AN),
    ("POST", "/infer/wsi_v2/{model}", AN),
    ("POST", "/activelearning/{strategy}", AN),
    ("POST", "/labeling/next", AN),  # reserves a case, as /activelearning does
    ("GET", "/labeling/proposal", AN),  # runs the model
    ("PUT", "/labeling/label", AN),
    ("POST", "/labeling/clicks", AN),  # runs the case's interactive model
    ("PUT", "/datastore/label", AN),
    ("PUT", "/datastore/label/info", AN),
    ("PUT", "/datastore/updatelabelinfo", AN),
    ("POST", "/datastore/label/restore", AN),  # restoring a version is a save
    ("PUT", "/datastore/", AN),
    ("PUT", "/datastore/image", AN),
    ("PUT", "/datastore/image/info", AN),
    ("PUT", "/session/", AN),
    ("GET", "/session/{session_id}", AN),
    ("DELETE", "/session/{session_id}", AN),
    # reviewing: approve or reject a label version
    ("PUT", "/datastore/label/review", RV),
    # administering
    ("POST", "/train/", AD),
    ("POST", "/train/{model}", AD),
    ("DELETE", "/train/", AD),
    ("POST", "/scoring/", AD),
    ("POST", "/scoring/{method}", AD),
    ("DELETE", "/scoring/", AD),
    ("POST", "/batch/infer/{model}", AD),
    ("DELETE", "/batch/infer", AD),
    ("GET", "/model/{model}", AD),
    ("GET", "/model/{model}/versions", AD),
    ("PUT", "/model/{model}", AD),
    ("PUT", "/model/{model}/serve", AD),
    ("DELETE", "/model/{model}", AD),
    ("DELETE", "/datastore/", AD),
    ("DELETE", "/datastore/image", AD),
    ("DELETE", "/datastore/label", AD),
    ("POST", "/datastore/restore", AD),  # undo a removal of an image or label
    ("GET", "/audit/", AD),
    ("GET", "/logs/", AD),
    ("GET", "/logs/gpu", AD),
    ("POST", "/reload", AD),
    # OHIF's Export > DICOM SEG > Save (STOW-RS of one SEG): a label save, never forwarded
    # (appcore.dicom.stow); admin until issue 25, like every other write below /proxy/dicom/
    *(
        ("POST", f"/proxy/dicom/{root}studies{study}", AN)
        for root in ("", "wado/", "stow/")
        for study in ("", "/{study}")
    ),
    ("POST,PUT,DELETE,PATCH", "/proxy/dicom/{path:path}", AD),  # never forwarded: users read, nothing else
)


@dataclass(frozen=True)
class _Pattern:
    methods: frozenset[str]
    path: str
    role: Role
    regex: Any


def _compiled(table: Sequence[tuple[str, str, Role]]) -> list[_Pattern]:
    from starlette.routing import compile_path

    patterns = []
    for methods, path, role in table:
        names = set(methods.split(","))
        if "GET" in names:
            names.add("HEAD")
        patterns.append(_Pattern(frozenset(names), path, role, compile_path(path)[0]))
    return patterns


class RoleTable:
    """``ROLE_TABLE`` compiled: the least role of a request, by its method and path."""

    def __init__(self, table: Sequence[tuple[str, str, Role]] = ROLE_TABLE) -> None:
        self.patterns = _compiled(table)
        # the paths clients use are few (ids go in query strings): remember the answers
        self.needed = functools.lru_cache(maxsize=4096)(self._needed)  # type: ignore[method-assign]

    def needed(self, method: str, path: str) -> tuple[Role, str]:
        """The role ``method path`` needs and the pattern that decided it (``_needed``, remembered)."""
        return self._needed(method, path)

    def _needed(self, method: str, path: str) -> tuple[Role, str]:
        """The role ``method path`` needs and the pattern that decided it.

        Every pattern matching the path counts, and the highest role wins; a catch-all pattern (a
        ``{...:path}`` parameter) counts only where no pattern without one matches the method and
        path (``POST /proxy/dicom/studies`` is annotator, any other POST below /proxy/dicom/ admin).
        A path matched only for
        other methods needs USER (the router answers 405); OPTIONS (a CORS preflight, which carries no
        token) is public; a path nothing matches needs ADMIN unless it is a declared path with or
        without its trailing ``/`` (the router redirects, and the redirected request is checked): that
        one needs the role of the path it leads to, at most USER.
        """
        if method == "OPTIONS":
            return Role.PUBLIC, "OPTIONS"
        hits = [p for p in self.patterns if p.regex.match(path)]
        chosen = [p for p in hits if method in p.methods]
        chosen = [p for p in chosen if ":path}" not in p.path] or chosen
        if chosen:
            best = max(chosen, key=lambda p: p.role)
            return best.role, f"{method} {best.path}"
        if hits:
            return Role.USER, f"{method} {hits[0].path} (not served)"
        other = path[:-1] if path.endswith("/") else path + "/"
        if any(p.regex.match(other) for p in self.patterns):
            # The router only redirects (no data): the role of where it leads, at most USER
            # (``/ohif`` is public as ``/ohif/`` is; ``/info`` needs USER).
            target = [p.role for p in self.patterns if p.regex.match(other) and method in p.methods]
            return min(max(target, default=Role.USER), Role.USER), f"{method} {other} (redirect)"
        return Role.ADMIN, f"{method} {path} (no row in appcore.auth.ROLE_TABLE)"

    def rows(self) -> list[tuple[str, str, Role]]:
        """The table as (methods, path, role), for the documentation."""
        return [(",".join(sorted(p.methods - {"HEAD"})), p.path, p.role) for p in self.patterns]


# -- the realm's keys and tokens ----------------------------------------------------------------------


class AuthError(RequestError):
    """A 401 (no usable token) or 403 (a role too low), with the header a bearer-token client reads."""

    def __init__(self, status_code: int, detail: str, *, error: str | None = None) -> None:
        challenge = f'Bearer realm="{REALM}"'
        if error is not None:
            description = detail.replace('"', "'").encode("ascii", "replace").decode("ascii")
            challenge += f', error="{error}", error_description="{description}"'
        super().__init__(status_code, detail)
        self.headers = {"WWW-Authenticate": challenge}


def unauthorized(detail: str, *, error: str | None = "invalid_token") -> AuthError:
    return AuthError(401, detail, error=error)


class RealmUnavailable(HTTPException):
    """The realm's keys or token endpoint could not be fetched: no token can be checked (503)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=503, detail=detail)


def _pem_key(text: str) -> Any:
    """A realm document's ``public_key`` (base64 DER, Keycloak's form, or PEM) as a key object."""
    from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

    text = text.strip()
    if text.startswith("-----BEGIN"):
        return load_pem_public_key(text.encode())
    return load_der_public_key(base64.b64decode(text))


def _jwks_keys(document: Any) -> dict[str | None, Any]:
    """The RSA signing keys of a JWKS document by ``kid``."""
    from jwt.algorithms import RSAAlgorithm

    keys: dict[str | None, Any] = {}
    for jwk in document.get("keys", []) if isinstance(document, dict) else []:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
            continue
        if jwk.get("alg", "RS256") not in ALGORITHMS:
            continue
        try:
            keys[jwk.get("kid")] = RSAAlgorithm.from_jwk(json.dumps(jwk))
        except Exception as e:  # one malformed key does not hide the others
            logger.warning("Realm JWKS key %s ignored: %s", jwk.get("kid"), e)
    return keys


def _get_json(url: str, timeout_s: float) -> Any:
    import requests

    response = requests.get(url, timeout=timeout_s)
    response.raise_for_status()
    return response.json()


class Realm:
    """The keys and token endpoint of the OpenID realm at ``uri``, fetched once and cached.

    ``uri`` is MONAI Label's ``MONAI_LABEL_AUTH_REALM_URI`` (Keycloak: ``.../realms/<name>``). Keys
    come from the realm document's ``public_key`` and from the JWKS its
    ``.well-known/openid-configuration`` names. A token whose ``kid`` is unknown makes the keys be
    fetched again (a key rotated in), at most once every ``refetch_s`` seconds.

    Args:
        uri: the realm's address.
        timeout_s: seconds each fetch may take.
        refetch_s: least seconds between two fetches.
        fetch: ``(url, timeout_s) -> JSON``; ``requests`` by default (tests count calls with it).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        uri: str,
        *,
        timeout_s: float = 10.0,
        refetch_s: float = REFETCH_S,
        fetch: Callable[[str, float], Any] = _get_json,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.timeout_s, self.refetch_s = timeout_s, refetch_s
        self._fetch, self._clock = fetch, clock
        self._lock = threading.Lock()
        self._keys: dict[str | None, Any] = {}  # kid -> key; None: the realm document's key
        self._config: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._error = ""
        self.fetches = 0

    def cached_keys(self, kid: str | None) -> list[Any] | None:
        """The keys to try on a token with ``kid``, or None when the keys must be fetched first."""
        if self._fetched_at is None or not self._keys:
            return None  # fetch (or say in a worker thread that the realm gave none)
        if kid is not None and kid not in self._keys and self._may_fetch():
            return None
        return self._candidates(kid)

    def keys(self, kid: str | None) -> list[Any]:
        """The keys to try on a token with ``kid``, fetching them if needed (blocking: call from a
        worker thread). Raises ``RealmUnavailable`` when the realm gave none."""
        with self._lock:
            unknown = kid is not None and kid not in self._keys
            if (self._fetched_at is None or unknown or not self._keys) and self._may_fetch():
                self._refresh()
        if not self._keys:
            raise RealmUnavailable(
                f"The authentication realm {self.uri} gave no key to check tokens with ({self._error}); "
                f"check MONAI_LABEL_AUTH_REALM_URI and that the realm answers. Retried after {self.refetch_s:g} s"
            )
        return self._candidates(kid)

    def _may_fetch(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self.refetch_s

    def _candidates(self, kid: str | None) -> list[Any]:
        if kid is not None and kid in self._keys:
            return [self._keys[kid]]
        # No kid, or one the realm does not list: the realm document's key (Keycloak's documents
        # give it without a kid), else every key (a token without kid from a one-key JWKS).
        if None in self._keys:
            return [self._keys[None]]
        return list(self._keys.values()) if kid is None else []

    def _refresh(self) -> None:
        """Fetch the realm document and the OpenID configuration's JWKS (either may be missing)."""
        self.fetches += 1
        self._fetched_at = self._clock()
        keys: dict[str | None, Any] = {}
        errors = []
        try:
            document = self._fetch(self.uri, self.timeout_s)
            if isinstance(document, dict) and document.get("public_key"):
                keys[None] = _pem_key(str(document["public_key"]))
        except Exception as e:
            errors.append(f"realm document: {type(e).__name__}: {e}")
        try:
            config = self._fetch(f"{self.uri}/.well-known/openid-configuration", self.timeout_s)
            if isinstance(config, dict):
                self._config = config
                if config.get("jwks_uri"):
                    keys.update(_jwks_keys(self._fetch(str(config["jwks_uri"]), self.timeout_s)))
        except Exception as e:
            errors.append(f"OpenID configuration: {type(e).__name__}: {e}")
        if keys:
            self._keys = keys
            logger.info("Realm %s: %d signing key(s) (%s)", self.uri, len(keys), sorted(str(k) for k in keys))
        self._error = "; ".join(errors) or "no RS256 key in the realm document or JWKS"
        if errors:
            logger.warning("Realm %s: %s", self.uri, self._error)

    def token_endpoint(self) -> str:
        """The realm's token endpoint (OpenID configuration), fetching it if needed (blocking)."""
        with self._lock:
            if not self._config.get("token_endpoint") and self._may_fetch():
                self._refresh()
        endpoint = self._config.get("token_endpoint")
        if not endpoint:
            raise RealmUnavailable(
                f"The authentication realm {self.uri} names no token endpoint in its "
                f".well-known/openid-configuration ({self._error}); check MONAI_LABEL_AUTH_REALM_URI"
            )
        return str(endpoint)


def _claim(payload: dict[str, Any], path: str) -> Any:
    """A claim by MONAI Label's path syntax: ``realm_access#roles`` is ``payload["realm_access"]["roles"]``."""
    value: Any = payload
    for part in path.split("#"):
        value = value.get(part) if isinstance(value, dict) else None
    return value


class TokenVerifier:
    """Checks bearer tokens against a ``Realm`` and MONAI Label's claim settings.

    A token that verified is remembered until it expires (the ``cache_size`` most recent ones): a
    client sends the same token with every request for minutes, and PyJWT's parsing alone costs
    about a millisecond on this project's CPU (``benchmarks/RESULTS.md``, "Token check").

    Args:
        realm: where the keys come from.
        cache_size: how many verified tokens are remembered.
        clock: seconds since the epoch (tokens' ``exp`` is in those).
    """

    def __init__(self, realm: Realm, *, cache_size: int = 1024, clock: Callable[[], float] = time.time) -> None:
        self.realm = realm
        self._verified: OrderedDict[str, tuple[User, float]] = OrderedDict()
        self._cache_size, self._clock = cache_size, clock
        self._cache_lock = threading.Lock()

    def cached(self, token: str) -> User | None:
        """The user of ``token`` if it verified before and has not expired since, else None."""
        with self._cache_lock:
            hit = self._verified.get(token)
            if hit is None:
                return None
            if self._clock() >= hit[1]:
                del self._verified[token]
                return None
            self._verified.move_to_end(token)
            return hit[0]

    def _remember(self, token: str, user: User, exp: float) -> None:
        with self._cache_lock:
            self._verified[token] = (user, exp + CLOCK_SKEW_S)
            while len(self._verified) > self._cache_size:
                self._verified.popitem(last=False)

    @staticmethod
    def kid(token: str) -> str | None:
        """The token's ``kid``; raises a 401 when the token is no JWT or not RS256."""
        try:
            encoded = token.split(".")[0]
            header = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
            if not isinstance(header, dict) or token.count(".") != 2:
                raise ValueError("expected three base64url segments, the first a JSON object")
        except ValueError as e:
            raise unauthorized(f"The bearer token is not a JWT ({e}); log in again to get one") from None
        if header.get("alg") not in ALGORITHMS:
            raise unauthorized(
                f"The bearer token is signed with {header.get('alg')!r}; this server accepts {ALGORITHMS} only"
            )
        kid = header.get("kid")
        return kid if isinstance(kid, str) else None

    def verify(self, token: str, keys: list[Any], kid: str | None) -> User:
        """The user of ``token`` checked with ``keys``; raises a 401 (``AuthError``) when it fails."""
        import jwt
        from monailabel.config import settings

        if not keys:
            raise unauthorized(
                f"The bearer token is signed with a key the realm {self.realm.uri} does not list (kid {kid!r}); "
                "log in again"
            )
        payload = None
        for key in keys:
            try:
                payload = jwt.decode(
                    token,
                    key,
                    algorithms=ALGORITHMS,
                    leeway=CLOCK_SKEW_S,
                    options={"require": ["exp"], "verify_aud": False},
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise unauthorized("The bearer token has expired; log in again (POST /auth/token)") from None
            except jwt.MissingRequiredClaimError as e:
                raise unauthorized(f"The bearer token has no {e.claim!r} claim; tokens must expire") from None
            except jwt.InvalidTokenError as e:
                raise unauthorized(f"The bearer token was refused: {e}") from None
        if payload is None:
            raise unauthorized(
                f"The bearer token's signature does not verify with the keys of the realm {self.realm.uri}: "
                "it was forged or issued by another realm; log in again"
            )
        name = payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or payload.get("sub")
        if not isinstance(name, str) or not name:
            raise unauthorized(f"The token names no user (no {settings.MONAI_LABEL_AUTH_TOKEN_USERNAME!r} or 'sub')")
        roles = _claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES)
        roles = frozenset(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else frozenset()
        client = payload.get("azp")
        user = User(name, roles, client if isinstance(client, str) else None)
        self._remember(token, user, float(payload["exp"]))
        return user

    def check(self, token: str) -> User:
        """Verify ``token``, fetching the realm's keys if needed (blocking: a worker thread or a test)."""
        user = self.cached(token)
        if user is not None:
            return user
        kid = self.kid(token)
        return self.verify(token, self.realm.keys(kid), kid)


def level(user: User) -> Role:
    """The highest role ``user``'s token names (PUBLIC when it names none of MONAI Label's)."""
    held = [role for role, name in role_names().items() if name in user.roles]
    return max(held, default=Role.PUBLIC)


def granted_names(user: User) -> list[str]:
    """The role names ``user`` holds, counting those their highest role grants (for MONAI Label's ``RBAC``)."""
    top = level(user)
    return [name for role, name in role_names().items() if role <= top]


def forbidden_role(user: User, needed: Role, what: str) -> AuthError:
    """A 403 naming the role ``what`` needs and those ``user`` holds (``error="insufficient_scope"``, RFC 6750)."""
    names = role_names()
    return AuthError(
        403,
        f"{what} needs the role {names[needed]!r} (or a higher one); user {user.name!r} has "
        f"{sorted(r for r in user.roles if r in names.values()) or 'none of the MONAI Label roles'}. "
        "Ask the realm's administrator to grant it",
        error="insufficient_scope",
    )


# -- the ASGI layer -----------------------------------------------------------------------------------

# The token ``AuthLayer`` verified for the request being served (``from_token`` trusts only that one).
_verified_token: ContextVar[str | None] = ContextVar("appcore_auth_token", default=None)


def bearer(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer`` header; raises a 401 for another scheme or an empty one."""
    values = [v for k, v in headers if k.lower() == b"authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise unauthorized("The request has several Authorization headers; send one")
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized(
            f"Authorization must be 'Bearer <token>', got the scheme {scheme!r}; log in (POST /auth/token)",
            error="invalid_request",
        )
    return token.strip()


class AuthLayer:
    """The ASGI layer that checks each request's token and role and sets ``current_user``.

    Args:
        app: the ASGI application it wraps.
        verifier: checks tokens; None with authentication off (every request is ``ANONYMOUS``).
        table: the role table.
    """

    def __init__(self, app: Any, verifier: TokenVerifier | None, table: RoleTable | None = None) -> None:
        self.app, self.verifier, self.table = app, verifier, table or RoleTable()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if self.verifier is None:
            current_user.set(ANONYMOUS)
            return await self.app(scope, receive, send)
        from starlette.routing import get_route_path

        method = scope.get("method", "WEBSOCKET")
        needed, what = self.table.needed(method, get_route_path(scope))
        # Anonymous until the token is verified: a request's context may start as a copy of the last
        # one's on its connection (uvicorn resumes reading from inside that request's task), and a
        # refused request must not be answered, or audited, as that request's user.
        current_user.set(ANONYMOUS)
        try:
            user = await self._user(scope, needed)
            if needed > Role.PUBLIC and level(user) < needed:
                current_user.set(user)  # verified: a 403 is audited as who tried, a 401 as anonymous
                raise forbidden_role(user, needed, what)
        except HTTPException as e:
            logger.warning("Refused %s %s: %s", method, scope.get("path"), e.detail)
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008, "reason": str(e.status_code)})
            from starlette.responses import JSONResponse

            response = JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers)
            return await response(scope, receive, send)
        current_user.set(user)
        await self.app(scope, receive, send)

    async def _user(self, scope: Any, needed: Role) -> User:
        assert self.verifier is not None
        if needed is Role.PUBLIC:  # a stale token sent along does not keep a client from logging in
            return ANONYMOUS
        token = bearer(scope.get("headers") or [])
        if token is None:
            raise unauthorized(
                "This endpoint needs a bearer token (Authorization: Bearer <token>); log in with "
                "POST /auth/token (3D Slicer: the MONAI Label module's login)",
                error=None,
            )
        cached = self.verifier.cached(token)
        if cached is not None:
            _verified_token.set(token)
            return cached
        kid = self.verifier.kid(token)
        keys = self.verifier.realm.cached_keys(kid)
        if keys is None:  # first request, or an unknown kid: fetch in a worker thread, not on the loop
            import anyio.to_thread

            keys = await anyio.to_thread.run_sync(self.verifier.realm.keys, kid)
        user = self.verifier.verify(token, keys, kid)
        _verified_token.set(token)
        return user


_VERIFIER: TokenVerifier | None = None


def verifier() -> TokenVerifier:
    """This process's verifier for MONAI Label's realm settings (made at the first call)."""
    global _VERIFIER
    from monailabel.config import settings

    if _VERIFIER is None or _VERIFIER.realm.uri != settings.MONAI_LABEL_AUTH_REALM_URI.rstrip("/"):
        realm = Realm(settings.MONAI_LABEL_AUTH_REALM_URI, timeout_s=float(settings.MONAI_LABEL_AUTH_TIMEOUT))
        _VERIFIER = TokenVerifier(realm)
    return _VERIFIER


def guard_requests(app: Any) -> bool:
    """Put ``AuthLayer`` around the running server's ASGI stack (the row of ``appcore.seam.table``).

    Returns whether the stack was changed (False outside a server process)."""
    from appcore.seam import server_stack, set_server_stack

    stack = server_stack()
    if stack is None:
        return False
    check = verifier() if auth_enabled() else None
    if isinstance(stack, AuthLayer):
        stack.verifier = check
    else:
        set_server_stack(AuthLayer(stack, check))
    if check is None:
        logger.info("Authentication is off (MONAI_LABEL_AUTH_ENABLE): every request is anonymous")
    else:
        names = {role.name.lower(): name for role, name in role_names().items()}
        logger.info("Authentication on: tokens of the realm %s, roles %s", check.realm.uri, names)
        # The keys, fetched now in the background: the log says at start whether the realm answers,
        # and the first request does not wait for it.
        threading.Thread(target=_prefetch, args=(check.realm,), name="realm-keys", daemon=True).start()
    return True


def _prefetch(realm: Realm) -> None:
    try:
        realm.keys(None)
    except HTTPException as e:
        logger.error("%s", e.detail)


# -- MONAI Label's own checks -------------------------------------------------------------------------


def from_token(token: str) -> Any:
    """In place of ``monailabel.endpoints.user.auth.from_token``, which MONAI Label's ``RBAC`` calls.

    The token was verified by ``AuthLayer`` for this request: the user is the one it set, with every
    role their highest role grants (MONAI Label's ``RBAC`` wants the exact role, and the role table
    asks at least what it asks). A token the layer did not verify (outside a request) is checked
    here. Raises ``jwt.InvalidTokenError`` as MONAI Label's does (its caller answers a 401).
    """
    import jwt
    from monailabel.endpoints.user.auth import DEFAULT_USER
    from monailabel.endpoints.user.auth import User as MonaiUser

    if not auth_enabled():
        return DEFAULT_USER
    if token and token == _verified_token.get():
        user = current_user.get()
    else:
        try:
            user = verifier().check(token)
        except HTTPException as e:
            raise jwt.InvalidTokenError(e.detail) from None
    return MonaiUser(username=user.name, name=user.name, roles=granted_names(user))


def password_login(username: str, password: str) -> dict[str, Any]:
    """The realm's answer to a password grant for MONAI Label's client (``MONAI_LABEL_AUTH_CLIENT_ID``).

    Raises a 401 for credentials the realm refuses (with its reason), a 503 when it does not answer."""
    import requests
    from monailabel.config import settings

    endpoint = verifier().realm.token_endpoint()
    data = {
        "client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID,
        "username": username,
        "password": password,
        "grant_type": "password",
    }
    try:
        response = requests.post(endpoint, data=data, timeout=float(settings.MONAI_LABEL_AUTH_TIMEOUT))
    except requests.RequestException as e:
        raise RealmUnavailable(f"The realm's token endpoint {endpoint} did not answer: {type(e).__name__}") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code in (400, 401, 403):
        reason = body.get("error_description") or body.get("error") or response.reason
        raise unauthorized(f"The realm refused the login of {username!r}: {reason}", error=None)
    if response.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
        raise RealmUnavailable(f"The realm's token endpoint {endpoint} answered {response.status_code}, not a token")
    return body


async def token(request: Request) -> Any:
    """``POST /auth/token`` (form ``username``, ``password``): a token from the realm, as 3D Slicer logs in.

    In place of MONAI Label's, which called the realm on the server's event loop and answered a
    refused password with a 500."""
    import anyio.to_thread
    from starlette.responses import JSONResponse

    if not auth_enabled():
        return JSONResponse(
            {"detail": "Authentication is off (MONAI_LABEL_AUTH_ENABLE is not set): no token is needed"},
            status_code=404,
        )
    form = await request.form()
    username, password = form.get("username"), form.get("password")
    if not isinstance(username, str) or not isinstance(password, str) or not username:
        return JSONResponse(
            {"detail": "POST /auth/token takes a form (x-www-form-urlencoded) with 'username' and 'password'"},
            status_code=422,
        )
    try:
        body = await anyio.to_thread.run_sync(password_login, username, password)
    except HTTPException as e:
        return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers)
    return JSONResponse(body)


# -- no open door -------------------------------------------------------------------------------------


def listening_host(argv: Sequence[str]) -> str | None:
    """The address ``monailabel start_server`` (or uvicorn) listens on, from its command line;
    None when ``argv`` is no server's."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--host", default=None)
    known, _ = parser.parse_known_args(list(argv[1:]))
    if known.host is not None:
        return str(known.host)
    if "start_server" in argv:
        return "0.0.0.0"  # MONAI Label's default: every interface
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reached only from this machine."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost" or name.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


class OpenDoorError(RuntimeError):
    """The server would listen on the network with authentication off."""


def check_open_door(host: str | None, *, enabled: bool, allow_anonymous: bool) -> None:
    """Refuse to serve on a non-loopback ``host`` with authentication off, unless ``allow_anonymous``.

    Raises:
        OpenDoorError: naming ``MONAI_LABEL_AUTH_ENABLE`` and ``--conf allow_anonymous true``.
    """
    if host is None or enabled or allow_anonymous or is_loopback(host):
        return
    raise OpenDoorError(
        f"Refusing to listen on {host} with authentication off: anyone who reaches it could label, "
        "delete labels, train and read the PACS. Set MONAI_LABEL_AUTH_ENABLE=true and "
        "MONAI_LABEL_AUTH_REALM_URI (docs/auth.md), listen on 127.0.0.1 (--host 127.0.0.1), or, if "
        "anonymous access from the network is intended, pass --conf allow_anonymous true"
    )


# -- documentation ------------------------------------------------------------------------------------


def markdown_table(table: Sequence[tuple[str, str, Role]] = ROLE_TABLE) -> str:
    """The role table as docs/auth.md shows it (``python -m appcore.auth`` prints it)."""
    lines = ["| least role | method | path |", "|---|---|---|"]
    for methods, path, role in sorted(table, key=lambda row: (row[2], row[1], row[0])):
        who = "none (public)" if role is Role.PUBLIC else f"{role.name.lower()} (`MONAI_LABEL_AUTH_ROLE_{role.name}`)"
        lines.append(f"| {who} | {methods.replace(',', ', ')} | `{path}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
