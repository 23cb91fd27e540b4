"""Authentication and roles (``appcore.auth``): real RS256 tokens of a realm served on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from appcore import auth
from appcore.auth import Realm, Role, RoleTable, TokenVerifier
from appcore.identity import User, current_user
from tests.conftest import HIPPO
from tests.realm import ADMIN, ANNOTATOR, REVIEWER, USER, SigningKey, new_key, serve_realm
from tests.realm import Realm as StandInRealm
from tests.servers import Server, monailabel_server

ROOT = Path(__file__).resolve().parents[2]
CASE = HIPPO / "imagesTr" / "hippocampus_001.nii.gz"
FREE = HIPPO / "imagesTr" / "hippocampus_003.nii.gz"  # no test of the module server labels it
needs_data = pytest.mark.skipif(not CASE.exists(), reason=f"needs the shared hippocampus data ({CASE})")

# -- the role table covers every route ---------------------------------------------------------------

_LIST_ROUTES = """
import json
import monailabel.app as server
from fastapi.routing import APIRoute, _IncludedRouter
from monailabel.endpoints.user.auth import RBAC


def flat(routes):
    for r in routes:
        if isinstance(r, _IncludedRouter):
            yield from flat(r.effective_candidates())
        else:
            yield r


def rbac(dependant):
    found = []
    for d in dependant.dependencies:
        if isinstance(d.call, RBAC):
            found += [d.call.roles] if isinstance(d.call.roles, str) else list(d.call.roles)
        found += rbac(d)
    return found


out = []
for r in flat(server.app.routes):
    original = getattr(r, "original_route", r)
    path = getattr(r, "path", None) or original.path
    methods = sorted(getattr(r, "methods", None) or getattr(original, "methods", None) or ["GET"])
    roles = rbac(original.dependant) if isinstance(original, APIRoute) else []
    out.append({"path": path, "methods": methods, "rbac": roles, "mount": type(original).__name__ == "Mount"})
print(json.dumps(out))
"""


def _monai_label_routes() -> list[dict[str, Any]]:
    """MONAI Label's routes with authentication on (its login routes included), with the roles its
    own ``RBAC`` dependencies ask, listed by a fresh interpreter (the routes depend on the setting)."""
    env = {**os.environ, "MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_TRACKING_ENABLED": "false"}
    done = subprocess.run(
        [sys.executable, "-c", _LIST_ROUTES], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _our_routes() -> list[dict[str, Any]]:
    """The routes ``appcore.seam`` puts in front of MONAI Label's (their own paths included)."""
    from appcore.seam import Kind
    from appcore.seam.table import ROWS

    routes = []
    for row in ROWS:
        if row.kind is Kind.ROUTE_IN_FRONT:
            methods, _, path = row.target.partition(" ")
            routes.append({"path": path, "methods": methods.split(","), "rbac": [], "mount": False})
    return routes


def _declared(table: RoleTable, method: str, path: str) -> Role | None:
    """The role a row of the table gives ``method path`` (the route's own pattern), None without one."""
    rows = [p for p in table.patterns if method in p.methods and p.regex.match(path)]
    return max((p.role for p in rows), default=None)


def test_role_table_covers_every_route() -> None:
    """Every route of the server (MONAI Label's with login on, and ours) has a row, and asks at least
    the role MONAI Label's own RBAC asks (which the layer's user then holds). A MONAI Label route
    that one of ours stands in front of (same path, same methods: ``/ohif/{path:path}``, OHIF 3.13
    in front of the wheel's OHIF, placed by the radiology app) is not reached, so its RBAC does not
    bind the row. (The pathology app serves the wheel's OHIF, whose RBAC then asks more than the row.)"""
    table, names = RoleTable(), auth.role_names()
    by_name = {name: role for role, name in names.items()}
    ours = _our_routes()
    in_front = {(m, r["path"]) for r in ours for m in r["methods"]}
    missing, weaker = [], []
    for route in _monai_label_routes() + ours:
        if all((m, route["path"]) in in_front for m in route["methods"] if m != "HEAD"):
            route = {**route, "rbac": []}
        # a route pattern stands for itself: fill its parameters with a sample value
        path = route["path"].replace("{path:path}", "x/y")
        for key in ("model", "strategy", "method", "session_id"):
            path = path.replace("{" + key + "}", "x")
        if route["mount"]:
            path += "/x.js"
        for method in route["methods"]:
            role = _declared(table, method, path)
            if role is None:
                missing.append(f"{method} {route['path']}")
            elif any(by_name[r] > role for r in route["rbac"] if r in by_name):
                weaker.append(f"{method} {route['path']}: table {role.name}, MONAI Label {route['rbac']}")
    assert not missing, f"routes with no row in appcore.auth.ROLE_TABLE: {missing}"
    assert not weaker, f"rows weaker than MONAI Label's own RBAC: {weaker}"


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/info/", Role.USER),
        ("HEAD", "/datastore/image", Role.USER),
        ("POST", "/infer/hippocampus", Role.ANNOTATOR),
        ("PUT", "/datastore/label/review", Role.REVIEWER),
        ("DELETE", "/datastore/image", Role.ADMIN),
        ("GET", "/proxy/dicom/studies", Role.USER),
        ("POST", "/proxy/dicom/studies", Role.ANNOTATOR),  # OHIF's export of a SEG: a label save (was ADMIN)
        ("POST", "/proxy/dicom/wado/studies", Role.ANNOTATOR),  # where OHIF posts it (its WADO root)
        ("POST", "/proxy/dicom/stow/studies/1.2.3", Role.ANNOTATOR),
        ("PUT", "/proxy/dicom/studies", Role.ADMIN),  # users read, nothing else
        ("POST", "/proxy/dicom/tools/create-dicom", Role.ADMIN),
        ("POST", "/proxy/dicom/wado/studies/1.2.3/series", Role.ADMIN),
        ("POST", "/proxy/dicom/qido/studies", Role.ADMIN),
        ("GET", "/proxy/dicom/wado/studies/1.2.3", Role.USER),
        ("GET", "/proxy/dicom/wado/%2e%2e/system", Role.USER),  # the proxy refuses it after the role check
        ("GET", "/not/a/route", Role.ADMIN),  # closed, not open
        ("GET", "/info", Role.USER),  # the router redirects to /info/, which is checked again
        ("PATCH", "/info/", Role.USER),  # the router answers 405
        ("OPTIONS", "/train/", Role.PUBLIC),  # a CORS preflight carries no token
        ("GET", "/auth/", Role.PUBLIC),
        ("POST", "/auth/token", Role.PUBLIC),
        # OHIF's files load without a token (the page shows its login); its studies come through the proxy
        ("GET", "/ohif/", Role.PUBLIC),
        ("GET", "/ohif", Role.PUBLIC),  # the router redirects to /ohif/
        ("HEAD", "/ohif/app-config.js", Role.PUBLIC),
        ("GET", "/ohif/labeling/auth.js", Role.PUBLIC),
        ("GET", "/ohif/segmentation", Role.PUBLIC),  # a route of the single-page app: index.html
        ("POST", "/ohif/", Role.USER),  # the router answers 405
        ("POST", "/ohif", Role.USER),
        ("GET", "/ohif/../proxy/dicom/studies", Role.PUBLIC),  # answered by /ohif/ (index.html), never the proxy
    ],
)
def test_role_needed(method: str, path: str, role: Role) -> None:
    assert RoleTable().needed(method, path)[0] is role


def test_docs_list_the_role_table() -> None:
    """docs/auth.md's role table is the table's rows (``python -m appcore.auth`` writes it)."""
    text = (ROOT / "docs" / "auth.md").read_text()
    assert auth.markdown_table() in text, "docs/auth.md is stale: rerun python -m appcore.auth"


# -- tokens -------------------------------------------------------------------------------------------


class FakeRealm:
    """A realm's documents in memory, served through ``Realm``'s ``fetch``, counting fetches."""

    def __init__(self, *, document_key: bool = True, jwks: bool = True) -> None:
        self.realm = StandInRealm(url="http://realm.test/realms/test")
        self.document_key, self.jwks, self.down = document_key, jwks, False
        self.urls: list[str] = []

    def fetch(self, url: str, timeout_s: float) -> Any:
        self.urls.append(url)
        if self.down:
            raise ConnectionError("realm down")
        base = self.realm.url
        if url == base:
            return {"public_key": self.realm.keys[0].public_der_b64()} if self.document_key else {"realm": "test"}
        if url == f"{base}/.well-known/openid-configuration":
            if not self.jwks:
                raise ConnectionError("no OpenID configuration")
            return {"jwks_uri": f"{base}/certs", "token_endpoint": f"{base}/token"}
        if url == f"{base}/certs":
            return {"keys": [k.jwk() for k in self.realm.keys]}
        raise AssertionError(url)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _verifier(fake: FakeRealm, clock: Clock | None = None) -> TokenVerifier:
    return TokenVerifier(Realm(fake.realm.url, fetch=fake.fetch, refetch_s=30, clock=clock or Clock()))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token written by hand: ``alg: none`` (no signature) or HS256 with ``secret``."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    signature = hmac.new(secret, head.encode(), hashlib.sha256).digest() if secret is not None else b""
    return head + "." + _b64(signature)


def _payload(**extra: Any) -> dict[str, Any]:
    """Claims of an admin token; a claim given as None is left out."""
    claims = {"exp": int(time.time()) + 600, "preferred_username": "mallory", "realm_access": {"roles": [ADMIN]}}
    return {k: v for k, v in {**claims, **extra}.items() if v is not None}


def _public_pem(realm: StandInRealm) -> bytes:
    return (
        realm.keys[0]
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


REFUSED_TOKENS = [
    ("expired", lambda r: r.token("alice", [ADMIN], expires_in=-3600), "has expired"),
    ("other key", lambda r: r.token("alice", [ADMIN], key=new_key()), "does not verify"),
    ("other key, unknown kid", lambda r: r.token("alice", [ADMIN], key=new_key(), kid="evil"), "does not verify"),
    ("no exp", lambda r: jwt.encode(_payload(exp=None), r.keys[0].private, "RS256"), "no 'exp' claim"),
    ("alg none", lambda r: _unsigned({"alg": "none", "typ": "JWT"}, _payload(), None), "RS256.* only"),
    ("HS256 with the public key", lambda r: _unsigned({"alg": "HS256"}, _payload(), _public_pem(r)), "RS256.* only"),
    ("not a JWT", lambda r: "not-a-token", "not a JWT"),
    ("no user", lambda r: r.token("", [ADMIN], claims={"sub": None}), "names no user"),
    ("tampered roles", lambda r: _tampered(r.token("alice", [USER])), "does not verify"),
]


def _tampered(token: str) -> str:
    head, body, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["realm_access"]["roles"] = [ADMIN]
    return f"{head}.{_b64(json.dumps(payload).encode())}.{signature}"


@pytest.mark.parametrize(("case", "make", "match"), REFUSED_TOKENS, ids=[c[0] for c in REFUSED_TOKENS])
def test_refused_tokens(case: str, make: Any, match: str) -> None:
    fake = FakeRealm()
    token = make(fake.realm)
    with pytest.raises(auth.AuthError, match=match) as refused:
        _verifier(fake).check(token)
    assert refused.value.status_code == 401
    assert refused.value.headers["WWW-Authenticate"].startswith('Bearer realm="monailabel", error="invalid_token"')


@pytest.mark.parametrize(
    ("document_key", "jwks", "kid"),
    [
        (True, True, "key-1"),  # Keycloak: both
        (False, True, "key-1"),  # a plain OIDC realm: the JWKS, by kid
        (True, False, "key-1"),  # the realm document only: its key, whatever the kid
        (True, False, None),
    ],
)
def test_valid_token_gives_user_and_roles(document_key: bool, jwks: bool, kid: str | None) -> None:
    fake = FakeRealm(document_key=document_key, jwks=jwks)
    token = fake.realm.token("alice", [ANNOTATOR], kid=kid or "")
    if kid is None:
        token = jwt.encode(jwt.decode(token, options={"verify_signature": False}), fake.realm.keys[0].private, "RS256")
    user = _verifier(fake).check(token)
    assert user == User("alice", frozenset({ANNOTATOR, "offline_access"}), "monailabel-app")
    assert auth.level(user) is Role.ANNOTATOR
    assert auth.granted_names(user) == [USER, ANNOTATOR]


ROLE_LESS_TOKENS = {
    "no roles": {},
    # Keycloak's client roles: MONAI Label reads realm_access.roles (MONAI_LABEL_AUTH_TOKEN_ROLES) only
    "roles only in resource_access": {
        "realm_access": None,
        "resource_access": {"monailabel-app": {"roles": [ADMIN]}, "account": {"roles": [ADMIN]}},
    },
    "realm_access without roles": {"realm_access": {}},
    "roles not a list": {"realm_access": {"roles": ADMIN}},
    "roles as a top-level claim": {"realm_access": None, "roles": [ADMIN]},
    "names close to the roles": {"realm_access": {"roles": ["monailabel-admins", "MONAILABEL-ADMIN", "admin"]}},
}


@pytest.mark.parametrize("claims", ROLE_LESS_TOKENS.values(), ids=ROLE_LESS_TOKENS)
def test_role_less_token_is_no_role(claims: dict[str, Any]) -> None:
    fake = FakeRealm()
    user = _verifier(fake).check(fake.realm.token("carol", [], claims=claims))
    assert auth.level(user) is Role.PUBLIC
    error = auth.forbidden_role(user, Role.USER, "GET /info/")
    assert error.status_code == 403
    assert "needs the role 'monailabel-user'" in error.detail and "none of the MONAI Label roles" in error.detail


def test_keys_cached_and_refetched_on_new_kid_rate_limited() -> None:
    fake, clock = FakeRealm(document_key=False), Clock()
    check = _verifier(fake, clock)
    for _ in range(5):
        check.check(fake.realm.token("alice", [USER]))
    assert check.realm.fetches == 1, "the keys are fetched once and cached"
    # the realm rotates its key: a token with the new kid makes the keys be fetched again, once
    fake.realm.keys.insert(0, SigningKey(new_key(), "key-2"))
    clock.now += 31
    assert check.check(fake.realm.token("alice", [USER])).name == "alice"
    assert check.realm.fetches == 2
    # unknown kids (forged) do not make the realm be asked at every request
    for _ in range(5):
        with pytest.raises(auth.AuthError, match="does not list"):
            check.check(fake.realm.token("alice", [USER], key=new_key(), kid="forged"))
    assert check.realm.fetches == 2
    clock.now += 31
    with pytest.raises(auth.AuthError, match="does not list"):
        check.check(fake.realm.token("alice", [USER], key=new_key(), kid="forged"))
    assert check.realm.fetches == 3


def test_verified_tokens_remembered_until_they_expire() -> None:
    """A verified token is not parsed again until it expires (with the clock skew allowed); a refused
    one is never remembered; the most recent ``cache_size`` are kept."""
    fake = FakeRealm()
    check = TokenVerifier(Realm(fake.realm.url, fetch=fake.fetch), cache_size=2)
    token = fake.realm.token("alice", [USER], expires_in=2 - auth.CLOCK_SKEW_S)  # valid for 2 more seconds
    assert check.check(token).name == "alice" and check.cached(token) is not None
    time.sleep(3.1)
    assert check.cached(token) is None
    with pytest.raises(auth.AuthError, match="has expired"):
        check.check(token)
    forged = fake.realm.token("alice", [ADMIN], key=new_key())
    for _ in range(2):
        with pytest.raises(auth.AuthError, match="does not verify"):
            check.check(forged)
    tokens = [fake.realm.token(name, [USER]) for name in ("a", "b", "c")]
    assert [check.check(t).name for t in tokens] == ["a", "b", "c"]
    assert [check.cached(t) is not None for t in tokens] == [False, True, True]


def test_realm_down_is_a_503_then_retried() -> None:
    fake, clock = FakeRealm(), Clock()
    fake.down = True
    check = _verifier(fake, clock)
    with pytest.raises(auth.RealmUnavailable, match="gave no key to check tokens with.*MONAI_LABEL_AUTH_REALM_URI"):
        check.check(fake.realm.token("alice", [USER]))
    fake.down = False
    unnamed = jwt.encode(_payload(), fake.realm.keys[0].private, "RS256")  # no kid
    with pytest.raises(auth.RealmUnavailable, match="Retried after 30 s"):
        check.check(unnamed)  # not asked again at once
    assert check.realm.cached_keys(None) is None, "no key: the layer asks in a worker thread, not on the loop"
    clock.now += 31
    assert check.check(unnamed).name == "mallory"


def test_realm_without_token_endpoint() -> None:
    fake = FakeRealm(jwks=False)
    with pytest.raises(auth.RealmUnavailable, match="names no token endpoint"):
        Realm(fake.realm.url, fetch=fake.fetch).token_endpoint()


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ([(b"authorization", b"Basic YWxpY2U6cHc=")], "must be 'Bearer <token>'"),
        ([(b"authorization", b"Bearer ")], "must be 'Bearer <token>'"),
        ([(b"authorization", b"Bearer a"), (b"Authorization", b"Bearer b")], "several Authorization headers"),
    ],
)
def test_bad_authorization_header(header: list[tuple[bytes, bytes]], match: str) -> None:
    with pytest.raises(auth.AuthError, match=match):
        auth.bearer(header)


@pytest.mark.parametrize(
    ("token_of", "status", "who"),
    [
        (None, 401, "anonymous"),  # no token
        (lambda realm: realm.token("anna", [ANNOTATOR], key=new_key()), 401, "anonymous"),  # forged
        # a role too low for DELETE /datastore/image: the token verified, so the audit log names who tried
        (lambda realm: realm.token("anna", [ANNOTATOR]), 403, "anna"),
    ],
    ids=["no token", "forged", "role too low"],
)
def test_a_refused_request_is_never_the_previous_request_s_user(token_of: Any, status: int, who: str) -> None:
    """A refused request is answered (and audited) as anonymous when its token did not verify, as
    its token's user when only the role was too low, never as the user of an earlier request held
    in its context: uvicorn resumes reading a keep-alive connection from inside the last request's
    task, so the next request's context starts as a copy of that one's."""
    import asyncio

    fake = FakeRealm()
    headers = [] if token_of is None else [(b"authorization", f"Bearer {token_of(fake.realm)}".encode())]
    scope = {"type": "http", "method": "DELETE", "path": "/datastore/image", "root_path": "", "headers": headers}
    scope["query_string"] = b"id=x"

    async def never_called(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a refused request reached the app")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    answered: list[tuple[int, str]] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":  # where the audit layer reads the user
            answered.append((message["status"], current_user.get().name))

    async def request_after_another() -> None:
        current_user.set(User("root", frozenset({ADMIN})))  # the previous request's user
        await auth.AuthLayer(never_called, _verifier(fake))(scope, receive, send)

    asyncio.run(request_after_another())
    assert answered == [(status, who)]


# -- the run's user is captured at request time --------------------------------------------------------


def test_training_run_signed_by_the_request_user() -> None:
    from appcore.app import _bad_train_params, _signed_by_user

    seen = []

    def run_model(model: str, params: dict | None = None, run_sync: bool = False, enqueue: bool = False) -> None:
        seen.append(params)

    reset = current_user.set(User("root", frozenset({ADMIN})))
    try:
        _signed_by_user(run_model)("hippocampus", {"max_epochs": 1}, False, False)
        _signed_by_user(run_model)("hippocampus")
    finally:
        current_user.reset(reset)
    assert seen == [{"max_epochs": 1, "started_by": "root"}, {"started_by": "root"}]
    refused = _bad_train_params(b'{"started_by": "someone else"}', "hippocampus")
    assert refused is not None and refused.status_code == 422 and "token" in refused.detail


# -- no open door ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "host"),
    [
        (["monailabel", "start_server", "--app", "a", "--studies", "s"], "0.0.0.0"),  # MONAI Label's default
        (["monailabel", "start_server", "--host", "127.0.0.1"], "127.0.0.1"),
        (["monailabel", "start_server", "-i", "10.0.0.5"], "10.0.0.5"),
        (["monailabel", "start_server", "--host=::"], "::"),
        (["pytest", "-q"], None),
    ],
)
def test_listening_host(argv: list[str], host: str | None) -> None:
    assert auth.listening_host(argv) == host


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.1", False),
        ("no-such-host.invalid", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("host", "enabled", "allow_anonymous", "refused"),
    [
        ("0.0.0.0", False, False, True),
        ("192.0.2.1", False, False, True),
        ("0.0.0.0", True, False, False),
        ("0.0.0.0", False, True, False),
        ("127.0.0.1", False, False, False),
        (None, False, False, False),
    ],
)
def test_open_door(host: str | None, enabled: bool, allow_anonymous: bool, refused: bool) -> None:
    if refused:
        with pytest.raises(auth.OpenDoorError, match="MONAI_LABEL_AUTH_ENABLE.*--conf allow_anonymous true"):
            auth.check_open_door(host, enabled=enabled, allow_anonymous=allow_anonymous)
    else:
        auth.check_open_door(host, enabled=enabled, allow_anonymous=allow_anonymous)


@needs_data
@pytest.mark.parametrize("allow_anonymous", [False, True], ids=["refused", "allow_anonymous true"])
def test_server_refuses_to_listen_on_the_network_without_auth(tmp_path: Path, allow_anonymous: bool) -> None:
    """``start_server --host <not loopback>`` with auth off stops before it binds, saying why;
    ``--conf allow_anonymous true`` lets it start up and go on to bind (192.0.2.1 is no address of
    this machine: the bind fails, so nothing ever listens on the network here)."""
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / CASE.name).write_bytes(CASE.read_bytes())
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "main.py").write_text((ROOT / "apps" / "radiology" / "main.py").read_text())
    launcher = Path(sys.executable).parent / "monailabel"
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "monailabel.main"]
    cmd += ["start_server", "--app", str(app_dir), "--studies", str(studies), "--host", "192.0.2.1", "--port", "8000"]
    cmd += ["--conf", "models", "hippocampus", "--conf", "score_on_start", "false"]
    cmd += ["--conf", "allow_anonymous", str(allow_anonymous).lower()]
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable, "MONAI_LABEL_TRACKING_ENABLED": "false"}
    env.pop("MONAI_LABEL_AUTH_ENABLE", None)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    if allow_anonymous:
        assert "Refusing to listen" not in output, output[-3000:]
        assert "Application startup complete" in output, output[-3000:]  # then the bind on 192.0.2.1 fails
        assert "192.0.2.1" in output and "bind" in output, output[-3000:]
    else:
        assert "Refusing to listen on 192.0.2.1 with authentication off" in output, output[-3000:]
        assert "MONAI_LABEL_AUTH_ENABLE" in output and "--conf allow_anonymous true" in output


# -- a real server with authentication on ---------------------------------------------------------------

USERS = {
    "ulla": ("pw-user", [USER]),
    "anna": ("pw-annotator", [ANNOTATOR]),
    "arne": ("pw-annotator-2", [ANNOTATOR]),  # a second annotator, on the same case as anna
    "rita": ("pw-reviewer", [REVIEWER]),
    "root": ("pw-admin", [ADMIN]),
    "nora": ("pw-none", []),
}
TOKEN_OF_ROLE = {Role.USER: "ulla", Role.ANNOTATOR: "anna", Role.REVIEWER: "rita", Role.ADMIN: "root"}


@pytest.fixture(scope="module")
def realm() -> Iterator[StandInRealm]:
    with serve_realm(StandInRealm(users=dict(USERS))) as served:
        yield served


@pytest.fixture(scope="module")
def server(realm: StandInRealm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not CASE.exists():
        pytest.skip(f"needs the shared hippocampus data ({CASE})")
    root = tmp_path_factory.mktemp("auth")
    studies = root / "studies"
    studies.mkdir()
    for image in (CASE, FREE):
        (studies / image.name).write_bytes(image.read_bytes())
    conf = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}
    conf["score_after_train"] = "false"
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url}
    with monailabel_server(root, str(studies), conf, env=env, probe="/auth/") as running:
        yield running


def _bearer(realm: StandInRealm, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {realm.token(name, USERS[name][1])}"}


def _auth_refusal(r: httpx.Response) -> bool:
    return r.status_code == 401 or (r.status_code == 403 and "needs the role" in r.text)


NII = {"files": {"label": ("x.nii.gz", b"")}}
# (method, url, request arguments, least role). The requests are harmless once let through: unknown
# names, missing files and bad parameters make the endpoints answer 4xx without changing anything.
ENDPOINTS: list[tuple[str, str, dict[str, Any], Role]] = [
    ("GET", "/", {}, Role.PUBLIC),
    ("GET", "/docs", {}, Role.PUBLIC),
    ("GET", "/openapi.json", {}, Role.PUBLIC),
    ("GET", "/favicon.ico", {}, Role.PUBLIC),
    ("GET", "/static/nothing.js", {}, Role.PUBLIC),
    ("GET", "/auth/", {}, Role.PUBLIC),
    ("POST", "/auth/token", {"data": {}}, Role.PUBLIC),
    ("GET", "/auth/token/valid", {}, Role.USER),
    ("GET", "/info/", {}, Role.USER),
    ("GET", "/model/info/hippocampus", {}, Role.ADMIN),
    ("GET", "/datastore/?output=all", {}, Role.USER),
    ("GET", "/datastore/image?image=nothing", {}, Role.USER),
    ("HEAD", "/datastore/image?image=nothing", {}, Role.USER),
    ("GET", "/datastore/image/info?image=nothing", {}, Role.USER),
    ("GET", "/datastore/label?label=nothing&tag=final", {}, Role.USER),
    ("GET", "/datastore/label/info?label=nothing&tag=final", {}, Role.USER),
    ("GET", "/datastore/label/versions?image=nothing&tag=final", {}, Role.USER),
    ("GET", "/datastore/tombstones", {}, Role.USER),
    ("GET", "/datastore/dataset", {}, Role.ANNOTATOR),
    ("GET", "/train/", {}, Role.USER),
    ("GET", "/scoring/", {}, Role.USER),
    ("GET", "/batch/infer", {}, Role.USER),
    ("GET", "/ohif/", {}, Role.PUBLIC),
    ("GET", "/ohif/app-config.js", {}, Role.PUBLIC),
    ("GET", "/ohif/labeling/auth.js", {}, Role.PUBLIC),  # the page's login
    ("GET", "/proxy/dicom/studies", {}, Role.USER),
    ("GET", "/labeling/status", {}, Role.USER),
    ("GET", "/proxy/dicom/wado/studies/1.2", {}, Role.USER),
    ("POST", "/infer/nomodel?image=hippocampus_001", {}, Role.ANNOTATOR),
    ("POST", "/infer/wsi/nomodel", {"json": {}}, Role.ANNOTATOR),
    ("POST", "/infer/wsi_v2/nomodel", {"json": {}}, Role.ANNOTATOR),
    ("POST", "/activelearning/nostrategy", {"json": {}}, Role.ANNOTATOR),
    ("POST", "/labeling/next?strategy=nostrategy&client_id=x", {}, Role.ANNOTATOR),
    ("GET", "/labeling/proposal?image=nothing", {}, Role.ANNOTATOR),
    ("PUT", "/labeling/label?image=nothing", {"json": {}}, Role.ANNOTATOR),
    ("POST", "/labeling/clicks?image=nothing", {"json": {}}, Role.ANNOTATOR),
    ("PUT", "/datastore/label?image=nothing&tag=final", NII, Role.ANNOTATOR),
    ("PUT", "/datastore/label/info?label=nothing&tag=final", {"json": {}}, Role.ANNOTATOR),
    ("PUT", "/datastore/updatelabelinfo?label=nothing&tag=final", {"json": {}}, Role.ANNOTATOR),
    ("PUT", "/datastore/?image=x", {}, Role.ANNOTATOR),
    ("PUT", "/datastore/image?image=x", {}, Role.ANNOTATOR),
    ("PUT", "/datastore/image/info?image=nothing", {"json": {}}, Role.ANNOTATOR),
    ("PUT", "/session/", {}, Role.ANNOTATOR),
    ("GET", "/session/nothing", {}, Role.ANNOTATOR),
    ("DELETE", "/session/nothing", {}, Role.ANNOTATOR),
    ("POST", "/datastore/label/restore?image=nothing&tag=final&version=1", {}, Role.ANNOTATOR),
    ("PUT", "/datastore/label/review?image=nothing&tag=final&state=approved", {}, Role.REVIEWER),
    ("POST", "/train/nomodel", {"json": {}}, Role.ADMIN),
    ("POST", "/train/", {"json": {"max_epochs": "x"}}, Role.ADMIN),
    ("DELETE", "/train/", {}, Role.ADMIN),
    ("POST", "/scoring/nomethod", {"json": {}}, Role.ADMIN),
    ("POST", "/scoring/", {"json": {"bundle_path": "/x"}}, Role.ADMIN),
    ("DELETE", "/scoring/", {}, Role.ADMIN),
    ("POST", "/batch/infer/nomodel", {"json": {"bundle_path": "/x"}}, Role.ADMIN),
    ("DELETE", "/batch/infer", {}, Role.ADMIN),
    ("GET", "/model/nomodel", {}, Role.ADMIN),
    ("GET", "/model/nomodel/versions", {}, Role.ADMIN),
    ("PUT", "/model/nomodel/serve?version=0", {}, Role.ADMIN),
    ("PUT", "/model/nomodel", {"files": {"file": ("w.pt", b"")}}, Role.ADMIN),
    ("DELETE", "/model/nomodel", {}, Role.ADMIN),
    ("DELETE", "/datastore/?id=nothing", {}, Role.ADMIN),
    ("DELETE", "/datastore/image?id=nothing", {}, Role.ADMIN),
    ("DELETE", "/datastore/label?id=nothing&tag=final", {}, Role.ADMIN),
    ("POST", "/datastore/restore?image=nothing", {}, Role.ADMIN),
    ("GET", "/audit/", {}, Role.ADMIN),
    ("GET", "/logs/", {}, Role.ADMIN),
    ("GET", "/logs/gpu", {}, Role.ADMIN),
    ("POST", "/reload", {}, Role.ADMIN),  # refusals only: it would rebuild the app
    # OHIF's Export > DICOM SEG > Save (STOW-RS): a label save; refused here (no PACS), nothing stored
    *(
        ("POST", f"/proxy/dicom/{root}studies{study}", {"content": b"x"}, Role.ANNOTATOR)
        for root in ("", "wado/", "stow/")
        for study in ("", "/1.2.3")
    ),
    ("POST", "/proxy/dicom/tools/create-dicom", {}, Role.ADMIN),
    *((m, "/proxy/dicom/studies", {}, Role.ADMIN) for m in ("PUT", "DELETE", "PATCH")),
    ("GET", "/no/such/route", {}, Role.ADMIN),
]
NOT_CALLED = {"/reload"}  # let through, these would change the server: only the refusals are checked


def test_every_row_is_tested_over_http() -> None:
    """Each row of ROLE_TABLE, each of its methods, is one of ENDPOINTS, with the row's role."""
    untested = []
    for pattern in RoleTable().patterns:
        for method in sorted(pattern.methods - {"HEAD"}):
            if not any(
                m == method and pattern.regex.match(url.split("?")[0]) and role is pattern.role
                for m, url, _, role in ENDPOINTS
            ):
                untested.append(f"{method} {pattern.path}")
    assert not untested, f"rows of appcore.auth.ROLE_TABLE not in ENDPOINTS: {untested}"


@pytest.mark.parametrize(("method", "url", "kwargs", "needed"), ENDPOINTS, ids=[f"{e[0]} {e[1]}" for e in ENDPOINTS])
def test_endpoint_roles(
    server: Server, realm: StandInRealm, method: str, url: str, kwargs: dict[str, Any], needed: Role
) -> None:
    """Each endpoint: 401 without a token, 403 (naming the role) below its role, let through from it on."""
    http = server.http
    anonymous = http.request(method, url, **kwargs)
    if needed is Role.PUBLIC:
        assert not _auth_refusal(anonymous), anonymous.text
        assert anonymous.status_code < 500, anonymous.text
    else:
        assert anonymous.status_code == 401, anonymous.text
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        role_less = http.request(method, url, headers=_bearer(realm, "nora"), **kwargs)
        assert role_less.status_code == 403, role_less.text
        assert role_less.headers["WWW-Authenticate"].startswith('Bearer realm="monailabel", error="insufficient_scope"')
        if method != "HEAD":
            assert "none of the MONAI Label roles" in role_less.text, role_less.text
    for role, name in TOKEN_OF_ROLE.items():
        if role >= needed and url in NOT_CALLED:
            continue
        r = http.request(method, url, headers=_bearer(realm, name), **kwargs)
        if role < needed:
            assert r.status_code == 403, (name, r.status_code, r.text)
            if method != "HEAD":
                assert f"needs the role '{auth.role_names()[needed]}'" in r.text, r.text
        elif url not in NOT_CALLED:
            assert not _auth_refusal(r), (name, r.status_code, r.text)
            assert r.status_code < 500, (name, r.status_code, r.text)


@pytest.mark.parametrize(
    ("case", "make", "match"),
    [c for c in REFUSED_TOKENS if c[0] in ("expired", "other key", "alg none", "tampered roles")],
    ids=["expired", "other key", "alg none", "tampered roles"],
)
def test_refused_tokens_over_http(server: Server, realm: StandInRealm, case: str, make: Any, match: str) -> None:
    r = server.http.get("/info/", headers={"Authorization": f"Bearer {make(realm)}"})
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="monailabel", error="invalid_token"')
    assert re.search(match, r.json()["detail"]), r.text


def test_slicer_login(server: Server, realm: StandInRealm) -> None:
    """3D Slicer's MONAI Label module logs in through /auth/token with the realm's password grant."""
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    client = MONAILabelClient(server.url)
    assert client.auth_enabled()
    r = server.http.post("/auth/token", data={"password": "x"}, headers={"Authorization": "Bearer stale"})
    assert r.status_code == 422 and "'username' and 'password'" in r.text, r.text
    with pytest.raises(MONAILabelClientException, match="Status: 401.*Invalid user credentials"):
        client.auth_token("anna", "wrong")
    token = client.auth_token("anna", "pw-annotator")
    client.update_auth(token)
    assert client.auth_valid_token()
    assert "hippocampus" in client.info()["models"]
    assert jwt.decode(token["access_token"], options={"verify_signature": False})["preferred_username"] == "anna"


def test_reservation_owner_is_the_token_user(server: Server, realm: StandInRealm) -> None:
    """Whatever ran before on the module server (the training test labels hippocampus_001), one
    case stays unlabeled: the strategy hands it out and holds it for the token's user."""
    r = server.http.post("/activelearning/random", json={"client_id": "slicer-7"}, headers=_bearer(realm, "anna"))
    assert r.status_code == 200, r.text
    assert r.json().get("id"), f"no case handed out: {r.text}"
    with contextlib.closing(sqlite3.connect(server.log.parent / "app" / "model" / "project.db")) as db:
        held = dict(db.execute("SELECT item, client FROM reservations"))
    assert held[r.json()["id"]] == "anna"


def test_a_label_s_author_is_the_token_user(server: Server, realm: StandInRealm) -> None:
    """A save's version and the stored label's info name the token's user, whatever ``client_id`` and
    the save's parameters say; so does an info update (MONAI Label's, which names its caller)."""
    anna = _bearer(realm, "anna")
    label = (HIPPO / "labelsTr" / CASE.name).read_bytes()
    spoof = json.dumps({"client_id": "mallory", "user": "mallory"})
    r = server.http.put(
        "/datastore/label",
        params={"image": "hippocampus_001", "tag": "final", "client_id": "mallory"},
        files={"label": (CASE.name, label)},
        data={"params": spoof},
        headers=anna,
    )
    assert r.status_code == 200, r.text
    listing = server.http.get("/datastore/label/versions", params={"image": "hippocampus_001"}, headers=anna).json()
    latest = listing["versions"][-1]
    assert (latest["user"], latest["client"]) == ("anna", "monailabel-app"), latest  # the token's user and azp
    where = {"label": "hippocampus_001", "tag": "final"}
    info = server.http.get("/datastore/label/info", params=where, headers=anna).json()
    assert info["user"] == "anna", info
    r = server.http.put("/datastore/label/info", params=where, data={"info": spoof}, headers=anna)
    assert r.status_code == 200, r.text
    info = server.http.get("/datastore/label/info", params=where, headers=anna).json()
    assert (info["user"], info["client_id"]) == ("anna", "mallory"), info


def test_two_annotators_on_one_case_a_review_and_a_restore_over_http(
    server: Server, realm: StandInRealm, tmp_path: Path
) -> None:
    """Anna and Arne save the same case; both versions are kept with their author, time, client and
    proposal, each served by number; an annotator cannot review, the reviewer rejects Arne's with a
    comment; Anna restores hers: a new version by her, the current label again."""
    import nibabel as nib
    import numpy as np

    anna, arne, rita = _bearer(realm, "anna"), _bearer(realm, "arne"), _bearer(realm, "rita")
    image, where = "hippocampus_001", {"image": "hippocampus_001", "tag": "final"}
    full = nib.load(HIPPO / "labelsTr" / CASE.name)
    anterior = tmp_path / CASE.name
    data = np.asarray(full.dataobj).copy()
    data[data == 2] = 0
    nib.save(nib.Nifti1Image(data, full.affine, full.header), anterior)

    def save(who: dict[str, str], path: Path, proposal: dict[str, Any] | None) -> None:
        params = json.dumps({"model": "hippocampus"} | ({"proposal": proposal} if proposal else {}))
        r = server.http.put(
            "/datastore/label", params=where, files={"label": (CASE.name, path.read_bytes())}, data={"params": params}
        )
        assert r.status_code == 401, r.text  # no token, nothing stored
        r = server.http.put(
            "/datastore/label",
            params=where,
            files={"label": (CASE.name, path.read_bytes())},
            data={"params": params},
            headers=who,
        )
        assert r.status_code == 200, r.text

    def values(content: bytes) -> set[int]:
        kept = tmp_path / "kept.nii.gz"
        kept.write_bytes(content)
        return set(np.unique(np.asarray(nib.load(kept).dataobj)).tolist())

    save(anna, anterior, {"model": "hippocampus", "version": 0})
    save(arne, HIPPO / "labelsTr" / CASE.name, None)
    listing = server.http.get("/datastore/label/versions", params=where, headers=_bearer(realm, "ulla")).json()
    hers, his = listing["versions"][-2:]
    assert (hers["user"], his["user"]) == ("anna", "arne"), listing
    assert listing["current"] == his["version"] == hers["version"] + 1
    assert hers["proposal"] == {"model": "hippocampus", "version": 0} and his["proposal"] is None
    assert hers["client"] == his["client"] == "monailabel-app" and hers["time"] <= his["time"]
    assert hers["review"]["state"] == his["review"]["state"] == "submitted"
    for version, expected in ((hers["version"], {0, 1}), (his["version"], {0, 1, 2})):
        kept = {"label": image, "tag": "final", "version": version}
        r = server.http.get("/datastore/label", params=kept, headers=anna)
        assert r.status_code == 200 and values(r.content) == expected, (version, r.status_code)

    review = {**where, "version": his["version"], "state": "rejected", "comment": "posterior overlaps the fornix"}
    refused = server.http.put("/datastore/label/review", params=review, headers=anna)
    assert refused.status_code == 403 and "monailabel-reviewer" in refused.text, refused.text
    r = server.http.put("/datastore/label/review", params=review, headers=rita)
    assert r.status_code == 200, r.text
    assert r.json()["review"] | {"time": None} == {
        "state": "rejected",
        "reviewer": "rita",
        "time": None,
        "comment": "posterior overlaps the fornix",
    }

    r = server.http.post("/datastore/label/restore", params={**where, "version": hers["version"]}, headers=anna)
    assert r.status_code == 200, r.text
    restored = r.json()
    assert (restored["user"], restored["origin"], restored["restored_from"]) == ("anna", "restore", hers["version"])
    assert restored["review"]["state"] == "submitted"
    current = server.http.get("/datastore/label", params={"label": image, "tag": "final"}, headers=anna)
    assert values(current.content) == {0, 1}


def test_a_save_without_a_proposal_records_the_infer_served_to_its_user(server: Server, realm: StandInRealm) -> None:
    """3D Slicer's module infers, then saves without naming the proposal: the version records the
    infer the server served that user for that image, marked as noted by the server."""
    rita = _bearer(realm, "rita")  # a reviewer may also infer and save
    where = {"image": "hippocampus_001", "tag": "final"}
    served = server.http.get("/info/", headers=rita).json()["models"]["hippocampus"]["served_version"]
    r = server.http.post("/infer/hippocampus", params={"image": "hippocampus_001", "output": "json"}, headers=rita)
    assert r.status_code == 200, r.text
    r = server.http.put(
        "/datastore/label",
        params=where,
        files={"label": (CASE.name, (HIPPO / "labelsTr" / CASE.name).read_bytes())},
        data={"params": json.dumps({"client_id": "3D Slicer"})},
        headers=rita,
    )
    assert r.status_code == 200, r.text
    mine = server.http.get("/datastore/label/versions", params=where, headers=rita).json()["versions"][-1]
    assert mine["user"] == "rita", mine
    assert (mine["proposal"], mine["proposal_from"]) == ({"model": "hippocampus", "version": served}, "server")


def test_a_batch_infer_s_labels_are_authored_by_the_token_user(server: Server, realm: StandInRealm) -> None:
    """The labels a batch infer saves (in a task process of its own) are versions of the admin who
    asked for it; a ``started_by`` sent by the client is refused. hippocampus_003 is never labelled
    ``final`` here: its ``original`` label does not make it labelled."""
    root = _bearer(realm, "root")
    body = {"device": "cpu", "label_tag": "original", "max_workers": 1}
    refused = server.http.post("/batch/infer/hippocampus", json={**body, "started_by": "mallory"}, headers=root)
    assert refused.status_code == 422 and "'started_by' is set by the server" in refused.text, refused.text
    r = server.http.post("/batch/infer/hippocampus", params={"images": "unlabeled"}, json=body, headers=root)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 900  # a hang guard: one infer in a fresh process on a loaded 2-core machine
    while (status := server.http.get("/batch/infer", headers=root).json()).get("status") not in ("DONE", "ERROR"):
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status["status"] == "DONE", status
    where = {"image": FREE.name.removesuffix(".nii.gz"), "tag": "original"}
    versions = server.http.get("/datastore/label/versions", params=where, headers=root)
    assert versions.status_code == 200, versions.text
    assert {v["user"] for v in versions.json()["versions"]} == {"root"}, versions.json()["versions"]


def test_weights_upload_and_training_started_by_token_user(server: Server, realm: StandInRealm) -> None:
    """An upload's and a training's version record name the token's user, not the client_id sent."""
    admin = _bearer(realm, "root")
    weights = server.http.get("/model/hippocampus", headers=admin)
    assert weights.status_code == 200, weights.text
    r = server.http.put(
        "/model/hippocampus?client_id=spoofed", files={"file": ("w.pt", weights.content)}, headers=admin
    )
    assert r.status_code == 200, r.text
    versions = server.http.get("/model/hippocampus/versions", headers=admin).json()["versions"]
    assert (versions[-1]["source"], versions[-1]["started_by"], versions[-1]["client"]) == ("upload", "root", "spoofed")

    label = (HIPPO / "labelsTr" / CASE.name).read_bytes()
    params = {"image": "hippocampus_001", "tag": "final"}
    r = server.http.put("/datastore/label", params=params, files={"label": (CASE.name, label)}, headers=admin)
    assert r.status_code == 200, r.text
    body = {"max_epochs": 1, "train_batch_size": 2, "client_id": "spoofed"}
    r = server.http.post("/train/hippocampus", json=body, headers=admin)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 900  # a hang guard: a 1-epoch run on a loaded 2-core machine
    while (status := server.http.get("/train/", headers=admin).json()).get("status") not in ("DONE", "ERROR"):
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status["status"] == "DONE", status
    versions = server.http.get("/model/hippocampus/versions", headers=admin).json()["versions"]
    run = versions[-1]
    assert (run["source"], run["started_by"], run["client"]) == ("training", "root", "spoofed"), run


@needs_data
def test_unreachable_realm_is_named_at_start_and_a_503(tmp_path: Path) -> None:
    """A realm that does not answer: the server starts, logs that it gave no key, and answers a
    token's request with a 503 naming the realm (not a 401: the token may be fine)."""
    from tests.servers import free_port

    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / CASE.name).write_bytes(CASE.read_bytes())
    nowhere = f"http://127.0.0.1:{free_port()}/realms/none"
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": nowhere, "MONAI_LABEL_AUTH_TIMEOUT": "2"}
    conf = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}
    token = StandInRealm().token("anna", [ANNOTATOR])
    with monailabel_server(tmp_path, str(studies), conf, env=env, probe="/auth/") as running:
        deadline = time.monotonic() + 60  # said at start, before any request needs a key
        while "[ERROR] (appcore.auth:" not in (log := running.log.read_text()) or nowhere not in log:
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(0.5)
        assert f"The authentication realm {nowhere} gave no key" in log
        r = running.http.get("/info/", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 503, r.text
        assert nowhere in r.json()["detail"] and "MONAI_LABEL_AUTH_REALM_URI" in r.json()["detail"]


def test_refused_before_the_body_is_read(server: Server) -> None:
    """A request without a token that announces a 10 MB body and sends none is answered 401 at once
    (not after --conf body_timeout_s, and nothing of it is received)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(
            b"PUT /datastore/label?image=hippocampus_001&tag=final HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 10000000\r\n\r\n"
        )
        answer = s.recv(4096).decode("latin-1")
    assert answer.startswith("HTTP/1.1 401"), answer
    assert "www-authenticate: bearer" in answer.lower(), answer


def test_the_audit_log_names_the_token_user(server: Server, realm: StandInRealm) -> None:
    """The audit layer (outside the auth layer) records the token's user, for a request refused for
    its role (403) too; a request whose token did not verify (401) is recorded as anonymous."""
    anna, root, nora = _bearer(realm, "anna"), _bearer(realm, "root"), _bearer(realm, "nora")
    saved = server.http.put("/datastore/label/info?label=nothing&tag=final", json={}, headers=anna)
    refused = server.http.delete("/datastore/image?id=audit-anna", headers=anna)
    assert refused.status_code == 403, refused.text
    role_less = server.http.post("/train/hippocampus?client_id=audit-nora", json={}, headers=nora)
    assert role_less.status_code == 403, role_less.text
    forged = {"Authorization": f"Bearer {realm.token('root', [ADMIN], key=new_key())}"}
    unverified = server.http.delete("/datastore/image?id=audit-forged", headers=forged)
    assert unverified.status_code == 401, unverified.text
    entries = server.http.get("/audit/", params={"limit": 1000}, headers=root).json()["entries"]
    mine = {(e["method"], e["path"], e["query"], e["status"]): e["user"] for e in entries}
    assert mine[("PUT", "/datastore/label/info", "label=nothing&tag=final", saved.status_code)] == "anna", entries
    assert mine[("DELETE", "/datastore/image", "id=audit-anna", 403)] == "anna", entries
    assert mine[("POST", "/train/hippocampus", "client_id=audit-nora", 403)] == "nora", entries
    assert mine[("DELETE", "/datastore/image", "id=audit-forged", 401)] == "anonymous", entries
