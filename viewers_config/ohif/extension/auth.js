/*
 * The OHIF page's login, when the server checks tokens (MONAI_LABEL_AUTH_ENABLE: docs/auth.md; how
 * it fits OHIF: docs/ohif.md, "Authentication"). An OHIF 3.13 extension written as a plain ES module,
 * listed in app-config.js before labeling.js, which imports its helpers (one module: the same URL).
 *
 * - Whether to log in: GET /auth/ (public) answers {"enabled": true} with authentication on, 404 off.
 * - When: in preRegistration. OHIF registers its extensions one after the other, awaiting each
 *   preRegistration, and renders nothing before: the page shows only this login, and the study list
 *   asks the PACS nothing until a token is there.
 * - How: user name and password, POST /auth/token (the realm's password grant, as 3D Slicer's MONAI
 *   Label module logs in); the token is checked with GET /auth/token/valid, which names the user and
 *   the roles, and kept for the tab (sessionStorage; a new tab logs in again).
 * - Where it goes: OHIF's own DICOMweb requests (study list, metadata, images, thumbnails) ask
 *   userAuthenticationService.getAuthorizationHeader() for each request: it is set here. The
 *   labeling panel's fetches add authHeaders().
 * - A 401 (an expired or revoked token): the login is shown again with the server's reason. The
 *   panel's request is sent again once logged in (the edits stay in the viewer); OHIF's DICOMweb
 *   requests report theirs through app-config.js's httpErrorHandler, and the study list is reloaded
 *   after the login.
 */

const TOKEN_KEY = 'labeling.token';
const USER_KEY = 'labeling.user';
const api = path => new URL(path, window.location.origin).toString();

let enabled = false;
let asking = null; // the login being shown: a promise of the user, shared by every caller

/** Whether the server checks tokens (known once preRegistration has asked it). */
export function authEnabled() {
  return enabled;
}

/** The logged-in user of this tab, {name, roles}, or null. */
export function currentUser() {
  try {
    return JSON.parse(sessionStorage.getItem(USER_KEY) || 'null');
  } catch {
    return null;
  }
}

/** `headers` with this tab's bearer token added (as they are with authentication off). */
export function authHeaders(headers = {}) {
  const token = enabled ? sessionStorage.getItem(TOKEN_KEY) : null;
  return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
}

/** Forget the token and show the login (a page load: nothing of the last user stays). */
export function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(USER_KEY);
  window.location.reload();
}

async function detailOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body.detail === 'string') {
      return body.detail;
    }
  } catch {
    // not JSON: the status says it
  }
  return `the server answered ${response.status} ${response.statusText}`;
}

// The user a token stands for, as the server sees it; throws with the server's reason.
async function checkToken(token) {
  const response = await fetch(api('/auth/token/valid'), { headers: { Authorization: `Bearer ${token}` } });
  if (!response.ok) {
    throw new Error(await detailOf(response));
  }
  const user = await response.json();
  return { name: user.username, roles: user.roles || [] };
}

async function passwordLogin(username, password) {
  let response;
  try {
    response = await fetch(api('/auth/token'), {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ username, password }),
    });
  } catch (e) {
    throw new Error(`The labeling server does not answer (${e.message}); try again`);
  }
  if (!response.ok) {
    throw new Error(await detailOf(response));
  }
  const answer = await response.json();
  if (!answer || !answer.access_token) {
    throw new Error('The server answered no access_token: is MONAI_LABEL_AUTH_ENABLE on?');
  }
  const user = await checkToken(answer.access_token);
  sessionStorage.setItem(TOKEN_KEY, answer.access_token);
  sessionStorage.setItem(USER_KEY, JSON.stringify(user));
  return user;
}

const FIELD = 'display:block;margin:4px 0 10px;padding:5px;width:100%;box-sizing:border-box;background:#111;color:#ddd;border:1px solid #555;border-radius:3px';

// The login form over the whole page; resolves with the user once a login succeeded.
function showLogin(reason) {
  return new Promise(resolve => {
    const message = document.createElement('div');
    message.dataset.cy = 'labeling-login-message';
    message.style.cssText = 'margin:8px 0 12px;color:#fc8181;white-space:pre-wrap';
    message.textContent = reason;
    const username = document.createElement('input');
    username.dataset.cy = 'labeling-login-username';
    username.autocomplete = 'username';
    username.style.cssText = FIELD;
    username.value = (currentUser() || {}).name || '';
    const password = document.createElement('input');
    password.dataset.cy = 'labeling-login-password';
    password.type = 'password';
    password.autocomplete = 'current-password';
    password.style.cssText = FIELD;
    const submit = document.createElement('button');
    submit.dataset.cy = 'labeling-login-submit';
    submit.type = 'submit';
    submit.textContent = 'Log in';
    submit.style.cssText = 'padding:6px 14px;border-radius:4px;background:#2b6cb0;color:#fff;border:0;cursor:pointer';
    const title = document.createElement('div');
    title.style.cssText = 'font-weight:bold;font-size:16px';
    title.textContent = 'Log in to the labeling server';
    const form = document.createElement('form');
    form.style.cssText = 'background:#1a202c;padding:20px;border-radius:6px;width:340px;color:#ddd;font:14px sans-serif';
    const nameLabel = document.createElement('label');
    nameLabel.append('User name', username);
    const passwordLabel = document.createElement('label');
    passwordLabel.append('Password', password);
    form.append(title, message, nameLabel, passwordLabel, submit);
    const overlay = document.createElement('div');
    overlay.dataset.cy = 'labeling-login';
    overlay.style.cssText = 'position:fixed;inset:0;z-index:2147483647;background:rgba(0,0,0,0.85);display:flex;align-items:center;justify-content:center';
    overlay.append(form);
    form.addEventListener('submit', async event => {
      event.preventDefault();
      submit.disabled = true;
      message.style.color = '#ddd';
      message.textContent = 'Logging in…';
      try {
        const user = await passwordLogin(username.value.trim(), password.value);
        overlay.remove();
        resolve(user);
      } catch (e) {
        message.style.color = '#fc8181';
        message.textContent = e.message;
        submit.disabled = false;
      }
    });
    document.body.append(overlay);
    (username.value ? password : username).focus();
  });
}

/**
 * Show the login with `reason` (why it is asked) and resolve with the user once logged in. Callers
 * asking while it is shown share it: one login, then each sends its request again.
 */
export function askLogin(reason) {
  if (!asking) {
    sessionStorage.removeItem(TOKEN_KEY);
    asking = showLogin(reason).finally(() => {
      asking = null;
    });
  }
  return asking;
}

const onStudyList = () => !/\/ohif\/[^/]+/.test(window.location.pathname);

// OHIF's DICOMweb errors (app-config.js's httpErrorHandler): a 401 asks for the login again.
function httpError(error) {
  if (!error || error.status !== 401 || asking) {
    return;
  }
  askLogin('The server refused your login for the images (expired or revoked): log in again').then(() => {
    if (onStudyList()) {
      window.location.reload(); // nothing to lose there: the list is asked again with the new token
    }
  });
}

async function serverChecksTokens() {
  try {
    const response = await fetch(api('/auth/'));
    if (!response.ok) {
      return false; // 404: authentication is off
    }
    const answer = await response.json();
    return Boolean(answer && answer.enabled);
  } catch {
    return false; // the server does not answer: OHIF says so on its own; it checks every request anyway
  }
}

export default {
  id: 'labeling-auth',
  async preRegistration({ servicesManager }) {
    enabled = await serverChecksTokens();
    if (!enabled) {
      return;
    }
    window.labelingAuth = { httpError };
    servicesManager.services.userAuthenticationService.setServiceImplementation({
      getAuthorizationHeader: () => authHeaders(),
      handleUnauthenticated: () => {
        httpError({ status: 401 });
        return null;
      },
    });
    let reason = 'This server needs a login: your user name and password of the realm (the same as in 3D Slicer)';
    const stored = sessionStorage.getItem(TOKEN_KEY);
    if (stored) {
      try {
        sessionStorage.setItem(USER_KEY, JSON.stringify(await checkToken(stored)));
        return;
      } catch (e) {
        reason = `${e.message}`;
      }
    }
    await askLogin(reason); // OHIF starts once logged in
  },
};
