/*
 * The labeling panel: an OHIF 3.13 extension written as a plain ES module (no build step), loaded by
 * OHIF with import() from app-config.js's `extensions`, its panel added to the segmentation mode by
 * app-config.js's customizationService. The server side is appcore/dicom/labeling.py (/labeling/...).
 *
 * A person picks a strategy and presses "Next case": the server picks a series for this annotator
 * (reserved for them), the viewer opens its study, and the model's proposal is loaded as an editable
 * labelmap with the model's label names and colours. OHIF's own tools (brush, eraser, undo) correct
 * it; "Save" sends the labelmap to the server, which stores it as the case's final label (a DICOM
 * SEG in the PACS). "Train" starts a training and shows its progress and validation Dice.
 *
 * React is not a global of the OHIF build, so the panel component renders one text node (a marker)
 * and the panel's controls are plain DOM inserted beside it; they survive React re-rendering the
 * marker, and are rebuilt when the panel is shown again. State that must outlive a page load (the
 * case handed out, its base) lives in sessionStorage; the annotator's name in localStorage.
 *
 * With authentication on (auth.js), every fetch carries the tab's bearer token (authHeaders()), a
 * 401 shows the login again and the request is sent once more after it, and the panel shows the
 * logged-in user instead of the annotator's name (the server takes the user from the token).
 */
import { askLogin, authEnabled, authHeaders, currentUser, logout } from './auth.js';

import { clickTool } from './clicks.js'; // the click tool (issue 26), a file of its own

const ID = 'labeling';
const MARKER = '\u2063\u2063\u2063';
const CASE_KEY = 'labeling.case';
const CASES_KEY = 'labeling.cases'; // the cases handed out in this tab, by study: Back and Forward find them
const api = path => new URL(path, window.location.origin).toString();

let services = null;
const ui = { root: null, message: '', error: false, progress: null, training: '', busy: false, strategies: [], epochs: '' };
// The proposal being put into the viewer: { key } of its case (image and hand-out). OHIF enters the
// mode more than once for one study; a newer case (Next case pressed meanwhile: no page load ends
// the old one now) supersedes it, and the old one stops at its next step.
let loading = null;
const SUPERSEDED = new Error('superseded by a newer case');

// -- small helpers ----------------------------------------------------------------------------------
function storedCase() {
  try {
    return JSON.parse(sessionStorage.getItem(CASE_KEY) || 'null');
  } catch {
    return null;
  }
}

function storeCase(c) {
  sessionStorage.setItem(CASE_KEY, JSON.stringify(c));
}

// The cases handed out in this tab, by study (c, when given, is added; the newest 32 are kept).
function handedOut(c) {
  let cases = {};
  try {
    cases = JSON.parse(sessionStorage.getItem(CASES_KEY) || '{}');
  } catch {
    cases = {};
  }
  if (c) {
    const { image, study, model, handedOutAt } = c;
    cases = { ...cases, [study]: { image, study, model, handedOutAt } };
    sessionStorage.setItem(CASES_KEY, JSON.stringify(Object.fromEntries(Object.entries(cases).slice(-32))));
  }
  return cases;
}

function annotator() {
  let name = localStorage.getItem('labeling.annotator');
  if (!name) {
    name = `annotator-${Math.random().toString(36).slice(2, 8)}`;
    localStorage.setItem('labeling.annotator', name);
  }
  return name;
}

function say(message, error = false) {
  ui.message = message;
  ui.error = error;
  render();
}

async function call(method, path, body, again = true) {
  let response;
  try {
    response = await fetch(api(path), {
      method,
      headers: authHeaders(body ? { 'Content-Type': 'application/json' } : {}),
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch (e) {
    throw new Error(`The labeling server does not answer (${e.message}); your edits stay in the viewer, try again`);
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    answer = null;
  }
  if (!response.ok) {
    let detail = answer && answer.detail;
    if (Array.isArray(detail)) {
      detail = detail.map(d => `${(d.loc || []).join('.')}: ${d.msg}`).join('; ');
    }
    if (response.status === 401 && authEnabled() && again) {
      await askLogin(detail || 'The server asks for a login'); // an expired or revoked token
      render(); // the user may be another one now
      return call(method, path, body, false);
    }
    const error = new Error(detail || `The server answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return answer;
}

async function inflate(b64) {
  const bytes = Uint8Array.from(atob(b64), ch => ch.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function deflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream('deflate'));
  const packed = new Uint8Array(await new Response(stream).arrayBuffer());
  let text = '';
  for (let i = 0; i < packed.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, packed.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

async function until(what, test, timeoutMs = 120000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = test();
    if (value) {
      return value;
    }
    if (Date.now() > deadline) {
      throw new Error(`The viewer did not get ready within ${timeoutMs / 1000} s: ${what}`);
    }
    await sleep(100);
  }
}

function currentStudy() {
  return new URLSearchParams(window.location.search).get('StudyInstanceUIDs');
}

// The SOP Instance UID of a source image, from its metadata (else from its wadors URL).
function sopOf(imageId) {
  const instance = window.cornerstone.metaData.get('instance', imageId);
  if (instance && instance.SOPInstanceUID) {
    return instance.SOPInstanceUID;
  }
  const match = /\/instances\/([0-9.]+)/.exec(imageId);
  return match ? match[1] : null;
}

// -- the viewer ----------------------------------------------------------------------------------
function caseDisplaySet(c) {
  const { displaySetService } = services;
  return displaySetService.getActiveDisplaySets().find(ds => ds.SeriesInstanceUID === c.image);
}

function viewportShowing(displaySet) {
  const { viewportGridService, cornerstoneViewportService } = services;
  const { viewports } = viewportGridService.getState();
  for (const [viewportId, viewport] of viewports) {
    const shown = viewport.displaySetInstanceUIDs || [];
    if (shown.includes(displaySet.displaySetInstanceUID) && cornerstoneViewportService.getCornerstoneViewport(viewportId)) {
      return viewportId;
    }
  }
  return null;
}

function labelmapImages(segmentationId) {
  const seg = window.cornerstoneTools.segmentation.state.getSegmentation(segmentationId);
  const data = seg && seg.representationData && seg.representationData.Labelmap;
  if (!data || !data.imageIds) {
    throw new Error('The segmentation has no labelmap images');
  }
  return data.imageIds.map(id => window.cornerstone.cache.getImage(id));
}

// Where the seconds from "Next case" to the proposal shown go (window.labelingTimes.next): each step's
// time since the click, kept in sessionStorage so that it survives a page load too.
const NEXT_KEY = 'labeling.nextClicked';

function nextStep(name) {
  const clicked = Number(sessionStorage.getItem(NEXT_KEY) || 0);
  if (!clicked) {
    return;
  }
  const next = { ...((window.labelingTimes || {}).next || {}), [name]: Date.now() - clicked };
  window.labelingTimes = { ...(window.labelingTimes || {}), next };
  performance.mark(`labeling:${name}`);
}

// Put the server's proposal (frames by SOP Instance UID) into a new labelmap on the case's series;
// current() says whether this case is still the one to show.
async function loadProposal(c, current) {
  const started = performance.now();
  const still = () => {
    if (!current()) {
      throw SUPERSEDED;
    }
  };
  nextStep('modeEnteredMs');
  const proposalRequest = call('GET', `/labeling/proposal?image=${encodeURIComponent(c.image)}`).then(answer => {
    nextStep('proposalReceivedMs');
    return answer;
  });
  proposalRequest.catch(() => null); // awaited below; a superseded case's failure is no one's
  const displaySet = await until('the case series is listed', () => !current() || caseDisplaySet(c));
  still();
  nextStep('seriesListedMs');
  const viewportId = await until('a viewport shows the case series', () => !current() || viewportShowing(displaySet));
  still();
  nextStep('viewportReadyMs');
  const proposal = await proposalRequest;
  const frames = await inflate(proposal.data);
  still();
  const { segmentationService } = services;
  for (const seg of segmentationService.getSegmentations()) {
    if (seg.segmentationId.startsWith('labeling-')) {
      segmentationService.remove(seg.segmentationId);
    }
  }
  const segments = {};
  for (const label of proposal.labels) {
    segments[label.id] = { label: label.name, active: label.id === proposal.labels[0].id };
  }
  const segmentationId = `labeling-${Date.now()}`;
  await segmentationService.createLabelmapForDisplaySet(displaySet, {
    segmentationId,
    label: `${proposal.model} (${proposal.source === 'final' ? 'saved label' : `model v${proposal.version}`})`,
    segments,
  });
  const index = new Map(proposal.instances.map((uid, i) => [uid, i]));
  const size = proposal.rows * proposal.columns;
  for (const image of labelmapImages(segmentationId)) {
    const k = index.get(sopOf(image.referencedImageId));
    if (k === undefined) {
      continue;
    }
    const pixels = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
    pixels.set(frames.subarray(k * size, (k + 1) * size));
  }
  await segmentationService.addSegmentationRepresentation(viewportId, { segmentationId });
  for (const label of proposal.labels) {
    segmentationService.setSegmentColor(viewportId, segmentationId, label.id, [...label.color, 255]);
  }
  window.cornerstoneTools.segmentation.triggerSegmentationEvents.triggerSegmentationDataModified(segmentationId);
  segmentationService.setActiveSegmentation(viewportId, segmentationId);
  if (!current()) {
    segmentationService.remove(segmentationId); // made while a newer case was handed out
    throw SUPERSEDED;
  }
  clicks.track(segmentationId); // the labelmap as proposed: hand edits are counted from it
  storeCase({
    ...c,
    base: proposal.base,
    segmentationId,
    model: proposal.model,
    source: proposal.source,
    version: proposal.version,
  });
  nextStep('proposalShownMs');
  sessionStorage.removeItem(NEXT_KEY);
  window.labelingTimes = {
    ...(window.labelingTimes || {}),
    proposalShownMs: performance.now() - started,
    proposalServer: proposal.timings,
    proposalComputedBy: proposal.computed_by,
  };
  const what = proposal.source === 'final' ? 'its saved label' : `the proposal of ${proposal.model} v${proposal.version}`;
  say(`Case ${c.image.slice(-8)}: ${what} is loaded; correct it and press Save`);
  document.body.dataset.labelingProposal = c.image;
}

// The study shown is not the open case's (the browser's Back or Forward, a study opened from the list):
// the case handed out here for that study becomes the open one and its proposal (or saved label) is
// loaded, as Next case does; a study never handed out here is said to have no proposal.
function followStudy() {
  const study = currentStudy();
  const c = storedCase();
  if (!study || !c || c.study === study) {
    return c;
  }
  clicks.reset();
  loading = null;
  delete document.body.dataset.labelingProposal;
  const known = handedOut()[study];
  if (known) {
    storeCase(known);
    return known;
  }
  say(`This study is not a case handed out here: no proposal is loaded (Save is off). Press Next case, or go back to case ${c.image.slice(-8)}`);
  return null;
}

function startCase() {
  const c = followStudy();
  const key = c && `${c.image} ${c.handedOutAt || ''}`;
  if (!c || !services || c.study !== currentStudy() || (loading && loading.key === key)) {
    return;
  }
  delete document.body.dataset.labelingProposal;
  say('Loading the proposal…');
  const mine = { key };
  loading = mine;
  loadProposal(c, () => loading === mine)
    .catch(e => e === SUPERSEDED || say(e.message, true))
    .finally(() => {
      if (loading === mine) {
        loading = null;
      }
    });
}

// -- actions ---------------------------------------------------------------------------------------
// Open the study inside the single-page app: OHIF's navigateHistory command (react-router) changes the
// URL, OHIF leaves the mode (its services drop the old case's display sets and segmentations) and
// enters it again on the new study, whose onModeEnter runs startCase; the bundle, the WebGL context
// and the image cache stay. Without that command (another OHIF build), a page load does the same.
function openStudy(study) {
  const url = new URL(window.location.href);
  url.searchParams.set('StudyInstanceUIDs', study);
  const base = (window.config && window.config.routerBasename) || '/';
  const commands = window.commandsManager;
  const inApp = url.pathname.startsWith(base) && commands && commands.getCommand && commands.getCommand('navigateHistory');
  if (!inApp || localStorage.getItem('labeling.reloadOnNext') === 'true') { // the latter: to compare
    window.location.assign(url.toString());
    return;
  }
  const to = `/${url.pathname.slice(base.length).replace(/^\/+/, '')}${url.search}`;
  commands.runCommand('navigateHistory', { to, options: { replace: false } });
}

async function nextCase(strategy) {
  ui.busy = true;
  say(`Asking the server for the next case (${strategy})…`);
  sessionStorage.setItem(NEXT_KEY, String(Date.now()));
  window.labelingTimes = { ...(window.labelingTimes || {}), next: {} };
  try {
    const answer = await call(
      'POST',
      `/labeling/next?strategy=${encodeURIComponent(strategy)}&client_id=${encodeURIComponent(annotator())}`
    );
    nextStep('handedOutMs');
    window.labelingTimes.nextServer = answer.timings;
    ui.progress = answer.progress;
    clicks.reset(); // the old case's clicks never go with the new one
    const c = { image: answer.image, study: answer.study, model: answer.model, handedOutAt: Date.now() };
    storeCase(c);
    handedOut(c);
    loading = null; // a proposal still loading is the old case's: it stops, the new one's starts
    localStorage.setItem('labeling.strategy', strategy);
    openStudy(answer.study); // startCase loads the proposal once OHIF has entered the mode on it
  } catch (e) {
    sessionStorage.removeItem(NEXT_KEY);
    say(e.message, true);
  } finally {
    ui.busy = false;
    render();
  }
}

async function save() {
  const c = storedCase();
  if (!c || !c.segmentationId || c.study !== currentStudy()) {
    say('No case is open here: press Next case first', true);
    return;
  }
  ui.busy = true;
  say('Saving…');
  const started = performance.now();
  window.labelingTimes = { ...(window.labelingTimes || {}), saveHandlerAt: Date.now() };
  try {
    const segmentation = services.segmentationService.getSegmentation(c.segmentationId);
    if (!segmentation) {
      throw new Error('The case\'s segmentation was removed from the viewer: press Next case or reload the page');
    }
    const images = labelmapImages(c.segmentationId);
    const first = images[0];
    const size = first.rows * first.columns;
    const frames = new Uint8Array(size * images.length);
    const instances = [];
    images.forEach((image, k) => {
      instances.push(sopOf(image.referencedImageId));
      const pixels = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
      frames.set(pixels, k * size);
    });
    const segments = {};
    for (const [index, segment] of Object.entries(segmentation.segments)) {
      if (segment) {
        segments[index] = segment.label;
      }
    }
    const data = await deflate(frames);
    const requested = performance.now();
    const answer = await call('PUT', `/labeling/label?image=${encodeURIComponent(c.image)}`, {
      model: c.model,
      instances,
      rows: first.rows,
      columns: first.columns,
      segments,
      base: c.base,
      data,
      client_id: annotator(),
      // the model's proposal the label was corrected from, kept with the label's version (not for a saved label's)
      proposal: c.source === 'model' ? { model: c.model, version: c.version } : undefined,
    });
    storeCase({ ...c, base: answer.base });
    ui.progress = answer.progress;
    window.labelingTimes = {
      ...(window.labelingTimes || {}),
      savedMs: performance.now() - started,
      saveServer: answer.timings,
      saveRequestMs: performance.now() - requested,
    };
    const training = answer.training_started ? ' Training started (enough new labels).' : '';
    say(`Saved as the final label (SEG ${answer.base.slice(-8)} in the PACS).${training}`);
    document.body.dataset.labelingSaved = answer.base;
    if (answer.training_started) {
      watchTraining(c.model);
    }
  } catch (e) {
    const prefix = e.status === 409 ? 'Conflict: ' : 'Not saved: ';
    say(`${prefix}${e.message}. Your edits are still here.`, true);
  } finally {
    ui.busy = false;
    render();
  }
}

async function train(epochs) {
  const c = storedCase();
  const model = (c && c.model) || null;
  if (!model) {
    say('Open a case first: training fine-tunes the model of the open case', true);
    return;
  }
  ui.busy = true;
  render();
  try {
    const params = epochs ? { max_epochs: epochs } : {};
    await call('POST', `/train/${encodeURIComponent(model)}`, params);
    ui.training = `Training ${model}: started`;
    watchTraining(model);
  } catch (e) {
    ui.training = `Training not started: ${e.message}`;
    document.body.dataset.labelingTrained = 'refused';
  } finally {
    ui.busy = false;
    render();
  }
}

async function watchTraining(model) {
  delete document.body.dataset.labelingTrained;
  const startedAt = Date.now() / 1000 - 5;
  for (;;) {
    await sleep(1000);
    let status;
    try {
      status = await call('GET', '/labeling/status');
    } catch (e) {
      ui.training = `Training ${model}: ${e.message}`;
      render();
      continue;
    }
    const info = status.models[model];
    const task = await call('GET', '/train/').catch(() => null);
    const lines = (task && task.details) || [];
    const epochLine = [...lines].reverse().find(line => /epoch/i.test(String(line)));
    if (info.training) {
      ui.training = `Training ${model}: running${epochLine ? ` (${String(epochLine).slice(-80)})` : ''}`;
      render();
      continue;
    }
    const run = info.last_run;
    if (!run || (run.at || 0) < startedAt) {
      ui.training = `Training ${model}: waiting for it to start`;
      render();
      continue;
    }
    let figure = 'no Dice reported';
    if (run.best_val_dice != null) {
      const was = run.start_val_dice != null ? `, was ${Number(run.start_val_dice).toFixed(3)}` : '';
      figure = `validation Dice ${Number(run.best_val_dice).toFixed(3)}${was}`;
    } else if (info.best_metric != null) {
      figure = `Dice ${Number(info.best_metric).toFixed(3)} on its training labels (under 5 labels none is held out)`;
    }
    if (run.published) {
      ui.training = `Training ${model}: version ${info.served_version} published, ${figure}. Next cases use it.`;
      document.body.dataset.labelingTrained = String(info.served_version);
    } else {
      ui.training = `Training ${model}: finished, nothing published (${run.error || run.stopped || figure})`;
      document.body.dataset.labelingTrained = 'not-published';
    }
    ui.progress = status.progress;
    render();
    return;
  }
}

// -- the panel -------------------------------------------------------------------------------------
function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === 'style') {
      node.style.cssText = value;
    } else if (key.startsWith('on')) {
      node.addEventListener(key.slice(2), value);
    } else {
      node.setAttribute(key, value);
    }
  }
  for (const child of children) {
    node.append(child);
  }
  return node;
}

const BUTTON = 'margin:4px 4px 4px 0;padding:4px 10px;border-radius:4px;background:#2b6cb0;color:#fff;border:0;cursor:pointer';
const FIELD = 'margin:2px 0 6px;padding:3px;width:100%;background:#111;color:#ddd;border:1px solid #444;border-radius:3px';

function render() {
  const root = ui.root;
  if (!root || !root.isConnected) {
    return;
  }
  const strategy = localStorage.getItem('labeling.strategy') || 'random';
  const options = (ui.strategies.length ? ui.strategies : [strategy]).map(name =>
    element('option', name === strategy ? { value: name, selected: 'selected' } : { value: name }, [name])
  );
  const strategySelect = element('select', { 'data-cy': 'labeling-strategy', style: FIELD }, options);
  const name = element('input', { 'data-cy': 'labeling-annotator', value: annotator(), style: FIELD });
  name.addEventListener('change', () => localStorage.setItem('labeling.annotator', name.value.trim() || annotator()));
  const epochs = element('input', { 'data-cy': 'labeling-epochs', type: 'number', min: '1', placeholder: 'server default', style: FIELD });
  epochs.value = ui.epochs || ''; // kept across the panel's re-renders
  epochs.addEventListener('input', () => {
    ui.epochs = epochs.value;
  });
  const disabled = ui.busy ? { disabled: 'disabled' } : {};
  const p = ui.progress;
  root.replaceChildren(
    element('div', { style: 'padding:8px;color:#ddd;font-size:13px' }, [
      element('div', { 'data-cy': 'labeling-title', style: 'font-weight:bold;margin-bottom:6px' }, ['Labeling']),
      ...whoFields(name),
      element('label', {}, ['Strategy']),
      strategySelect,
      element('button', { 'data-cy': 'labeling-next', style: BUTTON, onclick: () => nextCase(strategySelect.value), ...disabled }, ['Next case']),
      element('button', { 'data-cy': 'labeling-save', style: BUTTON, onclick: () => save(), ...disabled }, ['Save']),
      clicks.controls(),
      element('div', { 'data-cy': 'labeling-message', style: `margin:6px 0;color:${ui.error ? '#fc8181' : '#9ae6b4'}` }, [ui.message]),
      element('div', { 'data-cy': 'labeling-progress', style: 'margin:6px 0' }, [p ? `Labelled ${p.labeled} / ${p.total}` : '']),
      element('label', {}, ['Epochs']),
      epochs,
      element('button', { 'data-cy': 'labeling-train', style: BUTTON, onclick: () => train(parseInt(epochs.value, 10) || 0), ...disabled }, ['Train']),
      element('div', { 'data-cy': 'labeling-training', style: 'margin:6px 0' }, [ui.training]),
    ])
  );
}

// Who labels: the logged-in user with authentication on (reservations and label authors come from
// the token), else the annotator's name typed into the panel.
function whoFields(nameInput) {
  const user = authEnabled() && currentUser();
  if (!user) {
    return [element('label', {}, ['Annotator']), nameInput];
  }
  const role = user.roles.length ? ` (${user.roles[user.roles.length - 1]})` : '';
  return [
    element('div', { style: 'margin:2px 0 6px' }, [
      element('div', { 'data-cy': 'labeling-user' }, [`Logged in as ${user.name}${role}`]),
      element('button', { 'data-cy': 'labeling-logout', style: BUTTON, onclick: () => logout() }, ['Log out']),
    ]),
  ];
}

function mount() {
  if (ui.root && ui.root.isConnected) {
    return;
  }
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.nodeValue === MARKER) {
      ui.root = element('div', { 'data-cy': 'labeling-panel' });
      node.parentElement.append(ui.root);
      render();
      return;
    }
  }
}

function LabelingPanel() {
  setTimeout(mount, 0);
  return MARKER;
}

async function refreshStatus() {
  try {
    const status = await call('GET', '/labeling/status');
    ui.strategies = status.strategies;
    ui.progress = status.progress;
    render();
  } catch (e) {
    say(e.message, true);
  }
}

// -- clicks: the click tool of clicks.js, on the panel's requests and labelmap -----------------------------
const clicks = clickTool({
  call,
  services: () => services,
  openCase() {
    const c = storedCase();
    return c && c.segmentationId && c.study === currentStudy() ? c : null;
  },
  labelmapImages,
  sopOf,
  inflate,
  say,
  render,
  element,
});

export default {
  id: ID,
  preRegistration({ servicesManager }) {
    services = servicesManager.services;
    clicks.listen();
    // The panel's container comes and goes with its tab; look for the marker at most every 200 ms.
    let pending = false;
    new MutationObserver(() => {
      if (!pending && !(ui.root && ui.root.isConnected)) {
        pending = true;
        setTimeout(() => {
          pending = false;
          mount();
        }, 200);
      }
    }).observe(document.body, { childList: true, subtree: true });
  },
  onModeEnter({ servicesManager }) {
    services = servicesManager.services;
    refreshStatus();
    startCase();
  },
  getPanelModule() {
    return [
      {
        name: 'labeling',
        iconName: 'tab-segmentation',
        iconLabel: 'Labeling',
        label: 'Labeling',
        component: LabelingPanel,
      },
    ];
  },
};
