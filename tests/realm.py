"""A stand-in OpenID realm (what Keycloak serves for one realm) on 127.0.0.1, with an RSA key made here.

It serves the realm document (``public_key``), ``.well-known/openid-configuration``, the JWKS and
a password-grant token endpoint, and signs tokens the way Keycloak does (RS256, ``kid``,
``preferred_username``, ``realm_access.roles``, ``azp``, ``exp``).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

CLIENT_ID = "monailabel-app"  # MONAI Label's MONAI_LABEL_AUTH_CLIENT_ID default

ADMIN, REVIEWER, ANNOTATOR, USER = (
    "monailabel-admin",
    "monailabel-reviewer",
    "monailabel-annotator",
    "monailabel-user",
)


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class SigningKey:
    private: rsa.RSAPrivateKey
    kid: str

    def jwk(self) -> dict[str, Any]:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def public_der_b64(self) -> str:
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()


@dataclass
class Realm:
    """The realm's state: its signing keys (the first signs), users and how often each path was asked.

    Args:
        keys: signing keys; ``keys[0]`` signs new tokens and is the document's ``public_key``.
        users: name -> (password, roles).
        public_key_in_document: whether the realm document carries ``public_key`` (Keycloak's does).
    """

    keys: list[SigningKey] = field(default_factory=lambda: [SigningKey(new_key(), "key-1")])
    users: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    public_key_in_document: bool = True
    url: str = ""
    hits: Counter = field(default_factory=Counter)

    def token(
        self,
        name: str,
        roles: Sequence[str],
        *,
        expires_in: float = 600,
        key: rsa.RSAPrivateKey | None = None,
        kid: str | None = None,
        algorithm: str = "RS256",
        claims: dict[str, Any] | None = None,
    ) -> str:
        """A token for ``name`` with ``roles``, signed by the realm's first key unless ``key`` is given;
        a claim given as None in ``claims`` is left out."""
        now = int(time.time())
        payload = {
            "exp": now + int(expires_in),
            "iat": now,
            "jti": str(uuid.uuid4()),
            "iss": self.url,
            "sub": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
            "typ": "Bearer",
            "azp": CLIENT_ID,
            "preferred_username": name,
            "realm_access": {"roles": [*roles, "offline_access"]},
            **(claims or {}),
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        signer = key if key is not None else self.keys[0].private
        headers = {"kid": kid if kid is not None else self.keys[0].kid}
        return jwt.encode(payload, signer, algorithm=algorithm, headers=headers)


def _handler(realm: Realm, base: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = urlsplit(self.path).path
            realm.hits[path] += 1
            if path == base:
                document: dict[str, Any] = {"realm": "test", "token-service": f"{realm.url}/protocol/openid-connect"}
                if realm.public_key_in_document:
                    document["public_key"] = realm.keys[0].public_der_b64()
                return self._json(200, document)
            if path == f"{base}/.well-known/openid-configuration":
                return self._json(
                    200,
                    {
                        "issuer": realm.url,
                        "jwks_uri": f"{realm.url}/protocol/openid-connect/certs",
                        "token_endpoint": f"{realm.url}/protocol/openid-connect/token",
                    },
                )
            if path == f"{base}/protocol/openid-connect/certs":
                return self._json(200, {"keys": [k.jwk() for k in realm.keys]})
            return self._json(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            path = urlsplit(self.path).path
            realm.hits[path] += 1
            if path != f"{base}/protocol/openid-connect/token":
                return self._json(404, {"error": "not found"})
            length = int(self.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            if form.get("grant_type") != "password" or form.get("client_id") != CLIENT_ID:
                return self._json(400, {"error": "unauthorized_client", "error_description": "Invalid client"})
            name = form.get("username", "")
            password, roles = realm.users.get(name, (None, []))
            if password is None or form.get("password") != password:
                return self._json(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})
            token = realm.token(name, roles)
            return self._json(200, {"access_token": token, "token_type": "Bearer", "expires_in": 600})

    return Handler


@contextmanager
def serve_realm(realm: Realm | None = None) -> Iterator[Realm]:
    """``realm`` served on 127.0.0.1 at ``realm.url`` (``http://127.0.0.1:<port>/realms/test``)."""
    realm = realm or Realm()
    base = "/realms/test"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(realm, base))
    realm.url = f"http://127.0.0.1:{server.server_address[1]}{base}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield realm
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
