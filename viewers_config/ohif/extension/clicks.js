/*
 * The labeling panel's click tool (issue 26): clicks on the viewport corrected by the case's interactive
 * model (`<model>_interactive`, MONAI Label's DeepEdit contract), served next to labeling.js and used by it.
 *
 * With "Clicks" on, a left click on a viewport is not passed to OHIF's active tool: it becomes a click for
 * the segment chosen in the panel (Shift+click: a background click, made for that segment). The point
 * clicked is taken from the canvas to the world (cornerstone's viewport.canvasToWorld), then to a pixel
 * of the case series' image whose plane is nearest, from that image's own DICOM geometry (position,
 * orientation, pixel spacing): {SOP Instance UID, row, column}, the frame addressing of the proposal and
 * of Save, so the panel never needs the server's voxel order. Every click of the session goes to
 * POST /labeling/clicks each time; the server turns them into voxel indices, checks them (422 says which
 * click is wrong) and answers the interactive model's label as frames. Each segment that has clicks is
 * then replaced by the answer's label of that name; the other segments stay as they are.
 *
 * Undo (the button, or Ctrl+Z / Cmd+Z while the session has clicks) removes the last click and sends the
 * others again; a segment left with no click gets back what it was before the session's first click (a
 * snapshot of the labelmap taken then). The session belongs to the open case's labelmap: another case
 * (Next case) starts with no click. Save stores the result.
 *
 * Hand edits win: a voxel the person changed by hand (brush, eraser, OHIF's undo...) since the labelmap
 * was last written here (the proposal, or the last answer applied) keeps its hand value when an answer is
 * applied, and keeps it for the rest of the case. Every click of the session is drawn on the viewport
 * showing its image (markers.js).
 */

import { clickMarkers } from './markers.js';

const BACKGROUND = 'background';

const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];

/**
 * The pixel of a series under a world point (mm, patient coordinates): the image whose plane is nearest
 * to it, and the row and column whose centre is nearest. DICOM's definitions: ImagePositionPatient is the
 * centre of the first pixel, ImageOrientationPatient the directions of a row (the column index grows
 * along it) then of a column (the row index grows along it), PixelSpacing [between rows, between columns].
 *
 * @param {number[]} world the point
 * @param {object[]} planes {position, orientation, spacing, rows, columns} of each image, in slice order
 * @returns {{plane: object, row: number, column: number}}
 * @throws {Error} when the point is beyond the series' slices or outside its images
 */
export function pixelOf(world, planes) {
  let best = null;
  for (const plane of planes) {
    if (!plane.position || !plane.orientation) {
      throw new Error('The series has no image position or orientation: it cannot be clicked on');
    }
    const along = plane.orientation.slice(0, 3);
    const down = plane.orientation.slice(3, 6);
    const normal = [
      along[1] * down[2] - along[2] * down[1],
      along[2] * down[0] - along[0] * down[2],
      along[0] * down[1] - along[1] * down[0],
    ];
    const offset = [0, 1, 2].map(i => world[i] - plane.position[i]);
    const distance = Math.abs(dot(offset, normal));
    if (!best || distance < best.distance) {
      best = { plane, distance, offset, along, down, normal };
    }
  }
  if (!best) {
    throw new Error('The series has no image to click on');
  }
  // Half the distance between slices (of a one-image series: half a millimetre) is still on the series.
  let thickness = 1;
  if (planes.length > 1) {
    thickness = Math.abs(dot([0, 1, 2].map(i => planes[1].position[i] - planes[0].position[i]), best.normal));
  }
  if (best.distance > Math.max(thickness, 1e-3) / 2 + 1e-3) {
    throw new Error('The click is off the case series (another series, or beyond its slices): click on the case');
  }
  const { plane, offset } = best;
  const row = Math.round(dot(offset, best.down) / plane.spacing[0]);
  const column = Math.round(dot(offset, best.along) / plane.spacing[1]);
  if (row < 0 || row >= plane.rows || column < 0 || column >= plane.columns) {
    throw new Error(`The click is outside the image (row ${row}, column ${column}): click on the image`);
  }
  return { plane, row, column };
}

/**
 * The click tool of the panel. Everything it needs from the panel is passed in (the panel's requests go
 * through `call`, so whatever that adds to a request, this tool's requests get too).
 *
 * @param {object} panel
 * @param {Function} panel.call (method, path, body) => the server's JSON answer, or throws
 * @param {Function} panel.services () => OHIF's services
 * @param {Function} panel.openCase () => the case open in this viewer (with its segmentationId), or null
 * @param {Function} panel.labelmapImages (segmentationId) => the labelmap's images
 * @param {Function} panel.sopOf (imageId) => the SOP Instance UID of a source image
 * @param {Function} panel.inflate (base64 of zlib bytes) => Promise of the bytes
 * @param {Function} panel.say (message, error) => shows a message in the panel
 * @param {Function} panel.render () => renders the panel again
 * @param {Function} panel.element (tag, attributes, children) => a DOM element
 */
export function clickTool(panel) {
  const state = {
    on: false,
    segment: null, // the segment name clicks are made for
    segmentationId: null, // the labelmap the session's clicks belong to
    clicks: [], // {label, segment, instance, row, column, world, halfPixel}
    applied: [], // the clicks whose answer the labelmap shows
    touched: new Set(), // segment names replaced by an answer since the snapshot
    snapshot: null, // Map: SOP Instance UID -> the labelmap frame before the session's first click
    // Hand edits, for the whole case (not only the click session):
    handOf: null, // the labelmap they belong to
    written: null, // Map: SOP Instance UID -> the frame as last written here (the proposal, an answer)
    hand: new Map(), // SOP Instance UID -> mask (1: changed by hand since), frames with a hand edit only
    busy: false,
    again: false,
    undone: '', // what the last undo took back, said until its answer is applied
  };

  const markers = clickMarkers({
    clicks: () => sessionClicks(),
    colorOf,
    sopOf: panel.sopOf,
  });

  // A new click session on a labelmap: no click (the hand edits of the case stay known).
  function newSession(segmentationId) {
    Object.assign(state, { segmentationId, clicks: [], applied: [], touched: new Set(), snapshot: null });
  }

  /** Forget everything: another case is opened, or none (the markers go too). */
  function reset() {
    newSession(null);
    Object.assign(state, { handOf: null, written: null, hand: new Map() });
    markers.draw();
  }

  /** The labelmap as the proposal put it (called once it is loaded): hand edits are counted from it. */
  function track(segmentationId) {
    reset();
    Object.assign(state, { handOf: segmentationId, written: copies(framesBySop(segmentationId)) });
  }

  function copies(frames) {
    return new Map([...frames].map(([sop, pixels]) => [sop, pixels.slice()]));
  }

  // Mark what changed since the labelmap was last written here as hand edits (kept for the case).
  function noteHandEdits(segmentationId, current) {
    if (state.handOf !== segmentationId || !state.written) {
      Object.assign(state, { handOf: segmentationId, written: copies(current), hand: new Map() });
      return; // nothing known before: no hand edit
    }
    for (const [sop, pixels] of current) {
      const written = state.written.get(sop);
      if (!written) {
        continue; // a frame not known before (none is added to a labelmap): no hand edit known
      }
      let mask = state.hand.get(sop);
      for (let p = 0; p < pixels.length; p++) {
        if (pixels[p] !== written[p]) {
          if (!mask) {
            mask = new Uint8Array(pixels.length);
            state.hand.set(sop, mask);
          }
          mask[p] = 1;
        }
      }
    }
  }

  function colorOf(viewport, name) {
    const c = panel.openCase();
    try {
      const index = segmentIndex(c.segmentationId, name);
      const color = panel.services().segmentationService.getSegmentColor(viewport.id, c.segmentationId, index);
      return color ? `rgb(${color[0]},${color[1]},${color[2]})` : '#ff0';
    } catch {
      return '#ff0'; // a segment renamed or deleted meanwhile: still shown
    }
  }

  function segmentNames(c) {
    const segmentation = c && panel.services().segmentationService.getSegmentation(c.segmentationId);
    if (!segmentation) {
      return [];
    }
    return Object.values(segmentation.segments)
      .filter(segment => segment && segment.label)
      .map(segment => segment.label);
  }

  // The viewer's segment index of a segment name (as the server matches names: ignoring case).
  function segmentIndex(segmentationId, name) {
    const segmentation = panel.services().segmentationService.getSegmentation(segmentationId);
    for (const [index, segment] of Object.entries(segmentation.segments)) {
      if (segment && segment.label && segment.label.trim().toLowerCase() === name.toLowerCase()) {
        return Number(index);
      }
    }
    throw new Error(`The labelmap has no segment ${name}: it was renamed or deleted`);
  }

  function framesBySop(segmentationId) {
    const frames = new Map();
    for (const image of panel.labelmapImages(segmentationId)) {
      const pixels = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
      frames.set(panel.sopOf(image.referencedImageId), pixels);
    }
    return frames;
  }

  // -- where a click is -----------------------------------------------------------------------------
  function viewportAt(target) {
    const { viewportGridService, cornerstoneViewportService } = panel.services();
    for (const viewportId of viewportGridService.getState().viewports.keys()) {
      const viewport = cornerstoneViewportService.getCornerstoneViewport(viewportId);
      if (viewport && viewport.element && viewport.element.contains(target)) {
        return viewport;
      }
    }
    return null;
  }

  // An image's plane from its DICOM attributes (OHIF's 'instance' metadata).
  function plane(imageId) {
    const instance = window.cornerstone.metaData.get('instance', imageId) || {};
    const numbers = value => (value ? Array.from(value, Number) : null);
    return {
      imageId,
      position: numbers(instance.ImagePositionPatient),
      orientation: numbers(instance.ImageOrientationPatient),
      spacing: numbers(instance.PixelSpacing) || [1, 1],
      rows: Number(instance.Rows),
      columns: Number(instance.Columns),
    };
  }

  // The pixel under a world point, with its centre (where its marker is drawn) and half its size.
  function pixelAt(world, imageIds) {
    const { plane: p, row, column } = pixelOf(world, imageIds.map(plane));
    const centre = [0, 1, 2].map(i => p.position[i] + column * p.spacing[1] * p.orientation[i] + row * p.spacing[0] * p.orientation[3 + i]);
    return { instance: panel.sopOf(p.imageId), row, column, world: centre, halfPixel: Math.min(...p.spacing) / 2 };
  }

  // -- a click ---------------------------------------------------------------------------------------
  function onMouseDown(event) {
    if (!state.on || event.button !== 0 || !panel.services()) {
      return;
    }
    const viewport = viewportAt(event.target);
    if (!viewport) {
      return;
    }
    // The click is ours: OHIF's active tool (brush, window level...) does not see it.
    event.preventDefault();
    event.stopImmediatePropagation();
    const started = performance.now();
    try {
      const c = panel.openCase();
      if (!c) {
        throw new Error('No case is open here: press Next case first');
      }
      if (state.segmentationId !== c.segmentationId) {
        newSession(c.segmentationId);
      }
      const segment = state.segment || segmentNames(c)[0];
      if (!segment) {
        throw new Error('Choose the segment to click for');
      }
      const rect = viewport.canvas.getBoundingClientRect();
      const world = viewport.canvasToWorld([event.clientX - rect.left, event.clientY - rect.top]);
      const images = panel.labelmapImages(c.segmentationId).map(image => image.referencedImageId);
      const pixel = pixelAt(world, images);
      if (!state.snapshot) {
        state.snapshot = copies(framesBySop(c.segmentationId));
      }
      state.clicks.push({ label: event.shiftKey ? BACKGROUND : segment, segment, ...pixel });
      state.undone = '';
      state.touched.add(segment);
      markers.draw();
      update(c, started);
    } catch (e) {
      panel.say(e.message, true);
    }
  }

  // The clicks of the session, if it is the open case's (none once another case is shown).
  function sessionClicks() {
    const c = panel.openCase();
    return c && state.segmentationId === c.segmentationId ? state.clicks : [];
  }

  function describe(click) {
    const what = click.label === BACKGROUND ? `the background click (for ${click.segment})` : `the click for ${click.segment}`;
    return `${what} at row ${click.row}, column ${click.column}`;
  }

  function undo(how = '') {
    const c = panel.openCase();
    if (!sessionClicks().length) {
      panel.say('No click to undo', true);
      return;
    }
    const click = state.clicks.pop();
    markers.draw();
    const left = state.clicks.length;
    state.undone = `Undone${how}: ${describe(click)}; ${left} click${left === 1 ? '' : 's'} left`;
    panel.say(state.undone);
    update(c, performance.now());
  }

  // Ctrl+Z (Cmd+Z) undoes the last click while the session has clicks, before OHIF's hotkeys (on the
  // document) see it; without clicks, or in a text field, it is OHIF's (or the field's) undo.
  function onKeyDown(event) {
    const z = event.key === 'z' || event.key === 'Z';
    if (!z || !(event.ctrlKey || event.metaKey) || event.shiftKey || event.altKey) {
      return;
    }
    const field = event.target && event.target.closest && event.target.closest('input, textarea, select, [contenteditable="true"]');
    if (field || !sessionClicks().length) {
      return;
    }
    event.preventDefault();
    event.stopImmediatePropagation();
    if (!event.repeat) {
      undo(` (${event.metaKey ? 'Cmd' : 'Ctrl'}+Z)`);
    }
  }

  // Send every click (one request at a time; clicks made meanwhile go with the next one).
  async function update(c, started) {
    if (state.busy) {
      state.again = true;
      return;
    }
    state.busy = true;
    panel.render();
    try {
      do {
        state.again = false;
        const sent = state.clicks.slice();
        const segmenting = sent.length ? `Segmenting from ${sent.length} click${sent.length > 1 ? 's' : ''}…` : 'Undoing…';
        panel.say(state.undone ? `${state.undone}. ${segmenting}` : segmenting);
        const answer = sent.length
          ? await panel.call('POST', `/labeling/clicks?image=${encodeURIComponent(c.image)}`, {
              model: c.model,
              clicks: sent.map(({ label, instance, row, column }) => ({ label, instance, row, column })),
              client_id: localStorage.getItem('labeling.annotator') || '',
            })
          : null;
        if (state.again || state.segmentationId !== c.segmentationId) {
          continue; // more clicks came, or another case opened: this answer is out of date
        }
        await apply(c.segmentationId, answer, sent);
        state.applied = sent;
        window.labelingTimes = { ...(window.labelingTimes || {}), clickMs: performance.now() - started };
        if (answer) {
          document.body.dataset.labelingClick = JSON.stringify(answer.clicks[answer.clicks.length - 1]);
        } else {
          delete document.body.dataset.labelingClick;
        }
        document.body.dataset.labelingClicks = String(sent.length);
        const shown = sent.length
          ? `${sent.length} click${sent.length > 1 ? 's' : ''}: ${[...new Set(sent.map(k => k.segment))].join(', ')} from ${answer.interactive_model}; Save keeps it`
          : 'No click left: the segments are as before the first click (with your hand edits)';
        panel.say(state.undone ? `${state.undone}. ${shown}` : shown);
        state.undone = '';
      } while (state.again);
    } catch (e) {
      // Back to the clicks the labelmap shows: a refused click is not sent again with the next one.
      const dropped = state.clicks.length - state.applied.length;
      state.clicks = state.applied.slice();
      state.touched = new Set(state.applied.map(k => k.segment));
      markers.draw();
      const what = dropped > 0 ? `the last ${dropped === 1 ? 'click was' : `${dropped} clicks were`} dropped` : 'undo again';
      state.undone = '';
      panel.say(`Clicks not applied: ${e.message}; ${what}, the label map is as before`, true);
    } finally {
      state.busy = false;
      panel.render();
    }
  }

  /**
   * Replace each touched segment by the answer's label of that name (a segment whose clicks were all
   * undone: by its snapshot). A voxel the segment loses gets back what it held before the session's
   * first click (another segment's, or nothing); the other segments stay. A voxel changed by hand since
   * the labelmap was last written here keeps its hand value (hand edits win over the model).
   */
  async function apply(segmentationId, answer, sent) {
    const frames = answer ? await panel.inflate(answer.data) : null;
    const size = answer ? answer.rows * answer.columns : 0;
    const index = answer ? new Map(answer.instances.map((uid, k) => [uid, k])) : null;
    const clicked = new Set(sent.map(k => k.segment));
    const labelIds = new Map(((answer && answer.labels) || []).map(label => [label.name.toLowerCase(), label.id]));
    const current = framesBySop(segmentationId);
    noteHandEdits(segmentationId, current);
    for (const name of state.touched) {
      const value = segmentIndex(segmentationId, name);
      const labelId = labelIds.get(name.toLowerCase());
      if (clicked.has(name) && labelId === undefined) {
        throw new Error(`The model has no label ${name}; rename the segment to one of its labels`);
      }
      for (const [sop, pixels] of current) {
        const before = state.snapshot.get(sop);
        const k = index ? index.get(sop) : undefined;
        if (clicked.has(name) && k === undefined) {
          continue; // an image the answer does not cover (the server answers every image of the series)
        }
        const target = clicked.has(name) ? frames.subarray(k * size, (k + 1) * size) : before;
        const wanted = clicked.has(name) ? labelId : value;
        const hand = state.hand.get(sop);
        for (let p = 0; p < pixels.length; p++) {
          if (hand && hand[p]) {
            continue; // the person's value
          }
          if (target[p] === wanted) {
            pixels[p] = value;
          } else if (pixels[p] === value) {
            pixels[p] = before[p] === value ? 0 : before[p];
          }
        }
      }
    }
    state.touched = clicked;
    state.written = copies(current);
    if (!sent.length) {
      newSession(segmentationId); // the next click takes a new snapshot (with any painting done meanwhile)
    }
    window.cornerstoneTools.segmentation.triggerSegmentationEvents.triggerSegmentationDataModified(segmentationId);
  }

  // -- the panel's block -----------------------------------------------------------------------------
  const BUTTON = 'margin:4px 4px 4px 0;padding:4px 10px;border-radius:4px;color:#fff;border:0;cursor:pointer';

  function controls() {
    const { element } = panel;
    const c = panel.openCase();
    const names = segmentNames(c);
    if (!names.includes(state.segment)) {
      state.segment = names[0] || null;
    }
    const choice = element(
      'select',
      { 'data-cy': 'labeling-click-segment', style: 'margin:2px 0 6px;padding:3px;width:100%;background:#111;color:#ddd;border:1px solid #444;border-radius:3px' },
      names.map(name => element('option', name === state.segment ? { value: name, selected: 'selected' } : { value: name }, [name]))
    );
    choice.addEventListener('change', () => {
      state.segment = choice.value;
    });
    const count = c && state.segmentationId === c.segmentationId ? state.clicks.length : 0;
    const busy = state.busy ? { disabled: 'disabled' } : {};
    return element('div', { 'data-cy': 'labeling-clicks', style: 'margin:8px 0;padding-top:6px;border-top:1px solid #333' }, [
      element(
        'button',
        {
          'data-cy': 'labeling-clicks-toggle',
          'aria-pressed': String(state.on),
          style: `${BUTTON};background:${state.on ? '#2f855a' : '#4a5568'}`,
          onclick: () => {
            state.on = !state.on;
            panel.render();
          },
        },
        [state.on ? 'Clicks: on' : 'Clicks: off']
      ),
      element('button', { 'data-cy': 'labeling-click-undo', style: `${BUTTON};background:#2b6cb0`, onclick: () => undo(), ...busy }, ['Undo click']),
      // The segment choice while clicks are on only: its options carry the segments' names, which
      // OHIF's segment list (and whoever looks for it by name) shows too.
      ...(state.on ? [element('div', {}, ['Click for segment']), choice] : []),
      element('div', { 'data-cy': 'labeling-clicks-info', style: 'color:#aaa' }, [
        `${count} click${count === 1 ? '' : 's'}${state.on ? '; Shift+click: background' : ''}`,
      ]),
    ]);
  }

  function listen() {
    // On the window, in the capture phase: before cornerstone's listeners on the viewport element, and
    // before OHIF's hotkeys (Mousetrap, on the document).
    window.addEventListener('mousedown', onMouseDown, true);
    window.addEventListener('keydown', onKeyDown, true);
    markers.listen();
  }

  return { controls, listen, reset, track, state };
}
