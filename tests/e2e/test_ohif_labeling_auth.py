"""Labeling in OHIF with authentication on: the page's login, the token on every request, the user as author.

A realm served on 127.0.0.1 (``tests/realm.py``) signs the tokens; the server checks them
(``MONAI_LABEL_AUTH_ENABLE``). In headless Chromium, by clicks and typing only: the page shows its
login and asks the PACS nothing before it; after the login the study list, the next case, its
images (DICOMweb through the server's proxy, each request with the token) and the proposal load;
the save is stored with the user as the label's author. A token that expires asks for the login
again (on the study list, on a save, on a page load), and a user without the annotator role who
logs in is told why nothing was saved.
REST is used only to check what landed (the label's versions, the reservation). Fixtures and
helpers are test_ohif_labeling.py's (Orthanc with three hippocampus MR studies, the browser).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e import test_ohif_labeling as ohif
from tests.e2e.servers import Server, monailabel_server
from tests.realm import ANNOTATOR, USER, Realm, serve_realm

pytestmark = ohif.pytestmark

USERS = {"anna": ("pw-anna", [ANNOTATOR]), "ulla": ("pw-ulla", [USER]), "nora": ("pw-nora", [])}

# the fixtures of test_ohif_labeling.py (a module's own instances: its own Orthanc)
pacs = ohif.pacs
artifacts = ohif.artifacts
browser = ohif.browser


@pytest.fixture(scope="module")
def realm() -> Iterator[Realm]:
    with serve_realm(Realm(users=dict(USERS))) as served:
        yield served


@pytest.fixture(scope="module")
def server(
    pacs: tuple[Any, dict[str, str]], realm: Realm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    conf = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url}
    root = tmp_path_factory.mktemp("server")
    with monailabel_server(root, pacs[0].dicomweb_url, conf, env=env, probe="/auth/") as running:
        yield running


def bearer(realm: Realm, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {realm.token(name, USERS[name][1])}"}


def expired_token(realm: Realm) -> str:
    """Anna's token, signed by the realm, expired two minutes ago (beyond the 30 s of clock skew allowed)."""
    return realm.token("anna", USERS["anna"][1], expires_in=-120)


def log_in(page: Any, name: str) -> None:
    page.locator('[data-cy="labeling-login-username"]').fill(name)
    page.locator('[data-cy="labeling-login-password"]').fill(USERS[name][0])
    page.locator('[data-cy="labeling-login-submit"]').click()


def test_login_then_label_as_the_token_user(
    browser: Any, server: Server, realm: Realm, pacs: tuple[Any, dict[str, str]], artifacts: Path
) -> None:
    page = ohif.annotator(browser, artifacts, "anna")
    proxied: list[tuple[str, int, str | None]] = []  # DICOMweb through the server: url, status, Authorization

    def seen(response: Any) -> None:
        if "/proxy/dicom/" in response.url:
            proxied.append((response.url, response.status, response.request.headers.get("authorization")))

    page.on("response", seen)

    # 1. No token: the page shows the login and asks the PACS nothing.
    page.goto(f"{server.url}/ohif/", wait_until="domcontentloaded")
    login = page.locator('[data-cy="labeling-login"]')
    login.wait_for()
    message = page.locator('[data-cy="labeling-login-message"]')
    assert "needs a login" in message.inner_text()
    page.wait_for_load_state("networkidle")
    assert proxied == [], "no DICOMweb request before the login"
    assert page.get_by_text(re.compile(f"^{ohif.CASES[0]}")).count() == 0, "no study listed"
    ohif.shot(page, artifacts, "1-login")

    # 2. A wrong password is refused with the realm's reason, a user without any role is told which one
    #    is needed; anna's password opens the study list.
    page.locator('[data-cy="labeling-login-username"]').fill("anna")
    page.locator('[data-cy="labeling-login-password"]').fill("wrong")
    page.locator('[data-cy="labeling-login-submit"]').click()
    message.filter(has_text="Invalid user credentials").wait_for()
    log_in(page, "nora")  # the realm knows her, but she has none of MONAI Label's roles
    message.filter(has_text="none of the MONAI Label roles").wait_for()
    assert "needs the role 'monailabel-user'" in message.inner_text(), message.inner_text()
    assert login.is_visible() and proxied == []
    log_in(page, "anna")
    login.wait_for(state="detached")
    page.get_by_text(re.compile(f"^{ohif.CASES[0]}")).first.wait_for()
    ohif.shot(page, artifacts, "2-study-list")

    # 2b. The token expires on the study list: OHIF's next DICOMweb request (the study's series, as
    #     its row opens) is refused, the login is shown again, and the list is loaded again after it.
    page.evaluate("token => sessionStorage.setItem('labeling.token', token)", expired_token(realm))
    page.get_by_text(re.compile(f"^{ohif.CASES[0]}")).first.click()
    login.wait_for()
    assert "refused your login" in message.inner_text(), message.inner_text()
    assert [p for p in proxied if p[1] == 401], "the series query was refused"
    log_in(page, "anna")
    login.wait_for(state="detached")
    page.get_by_text(re.compile(f"^{ohif.CASES[0]}")).first.wait_for()

    # 3. The next case, its images and its proposal, each DICOMweb request with anna's token.
    ohif.open_segmentation_mode(page, server.url, ohif.CASES[0])
    proxied.clear()  # from here on, every DICOMweb request carries a valid token
    user_line = page.locator('[data-cy="labeling-user"]')
    assert user_line.inner_text() == f"Logged in as anna ({ANNOTATOR})"
    case = ohif.press_next_case(page)
    sops, _ = ohif.series_order(pacs, case["image"])
    proposal = ohif.viewer_label(page, case, sops)
    assert {1, 2} <= set(np.unique(proposal).tolist()), "the model's proposal is in the viewer"
    page.locator(".cornerstone-canvas").first.wait_for()
    frames = [p for p in proxied if "/frames/" in p[0]]
    assert frames and all(status == 200 for _, status, _ in frames), f"the images' frames: {frames[:3]}"
    refused = [p for p in proxied if p[1] >= 400 or not (p[2] or "").startswith("Bearer ey")]
    assert not refused, f"DICOMweb requests without the token or refused: {refused[:3]}"
    db = server.log.parent / "app" / "model" / "project.db"
    with contextlib.closing(sqlite3.connect(db)) as connection:
        held = dict(connection.execute("SELECT item, client FROM reservations"))
    assert held[case["image"]] == "anna", "reserved for the token's user, not the panel's client_id"
    ohif.shot(page, artifacts, "3-proposal")

    # 4. Save: the label's author is the token's user.
    page.locator('[data-cy="labeling-save"]').click()
    page.wait_for_function("document.body.dataset.labelingSaved")
    assert "Saved as the final label" in page.locator('[data-cy="labeling-message"]').inner_text()
    versions_url = f"/datastore/label/versions?image={case['image']}&tag=final"
    r = server.http.get(versions_url, headers=bearer(realm, "ulla"))
    assert r.status_code == 200, r.text
    assert [(v["version"], v["user"]) for v in r.json()["versions"]] == [(1, "anna")]
    started_from = r.json()["versions"][0]["proposal"]  # the model's proposal the panel showed, kept with it
    assert started_from is not None and started_from["model"] == case["model"], r.json()["versions"][0]
    assert isinstance(started_from["version"], int), started_from
    ohif.shot(page, artifacts, "4-saved")

    # 5. The token expires: the next save asks for the login again, with the server's reason. A user
    #    without the annotator role logs in: the save is refused, saying why; the edits stay.
    held_label = ohif.viewer_label(page, case, sops)
    page.evaluate("token => sessionStorage.setItem('labeling.token', token)", expired_token(realm))
    page.locator('[data-cy="labeling-save"]').click()
    login.wait_for()
    assert "expired" in message.inner_text(), message.inner_text()
    ohif.shot(page, artifacts, "5-login-again")
    log_in(page, "ulla")
    login.wait_for(state="detached")
    panel_message = page.locator('[data-cy="labeling-message"]')
    panel_message.filter(has_text="Not saved").wait_for()
    text = panel_message.inner_text()
    assert f"needs the role '{ANNOTATOR}'" in text and "'ulla'" in text and "edits are still here" in text, text
    assert user_line.inner_text() == f"Logged in as ulla ({USER})"
    np.testing.assert_array_equal(ohif.viewer_label(page, case, sops), held_label)
    r = server.http.get(versions_url, headers=bearer(realm, "ulla"))
    assert [(v["version"], v["user"]) for v in r.json()["versions"]] == [(1, "anna")], "nothing saved by ulla"
    ohif.shot(page, artifacts, "6-no-annotator-role")

    # 6. A page loaded with an expired token shows the login with the server's reason, and asks the
    #    PACS nothing.
    page.evaluate("token => sessionStorage.setItem('labeling.token', token)", expired_token(realm))
    proxied.clear()
    page.goto(f"{server.url}/ohif/", wait_until="domcontentloaded")
    login.wait_for()
    assert "expired" in message.inner_text(), message.inner_text()
    page.wait_for_load_state("networkidle")
    assert proxied == [], "no DICOMweb request before the login"
    page.close()
