/*
 * The click tool's markers (issue 26): every click of the session drawn over each viewport that shows the
 * image it was made on, a small filled circle in the segment's colour for a click for a segment, a white
 * ring with a cross for a background click.
 *
 * They are not cornerstone annotations (those would enter OHIF's measurement panel and its exports): one
 * SVG per viewport, beside cornerstone's own SVG layer in the viewport's element, that takes no mouse
 * event (pointer-events: none). A point goes to the canvas with the viewport's worldToCanvas; the SVG is
 * drawn again after each render of the viewport (CORNERSTONE_IMAGE_RENDERED: a new slice, zoom, pan,
 * resize), caught on the window in the capture phase, so viewports made later are covered too.
 */

const SVG = 'http://www.w3.org/2000/svg';
const RENDERED = 'CORNERSTONE_IMAGE_RENDERED';
const RADIUS = 5; // px on the screen, whatever the zoom

function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) {
    node.setAttribute(key, String(value));
  }
  return node;
}

// Whether a viewport shows the image a click was made on: the same SOP Instance UID where the viewport
// names its image (a stack, or a volume seen along its slices); else the click within half a pixel of
// the viewport's plane (a reformatted view).
function shows(viewport, click, sopOf) {
  const imageId = viewport.getCurrentImageId && viewport.getCurrentImageId();
  if (imageId) {
    return sopOf(imageId) === click.instance;
  }
  const { focalPoint, viewPlaneNormal } = viewport.getCamera();
  if (!focalPoint || !viewPlaneNormal) {
    return false;
  }
  const distance = [0, 1, 2].reduce((sum, i) => sum + (click.world[i] - focalPoint[i]) * viewPlaneNormal[i], 0);
  return Math.abs(distance) <= click.halfPixel;
}

function marker(click, x, y, color) {
  const attributes = {
    'data-cy': 'labeling-click-marker',
    'data-label': click.label,
    'data-segment': click.segment,
    'data-instance': click.instance,
    'data-row': click.row,
    'data-column': click.column,
    transform: `translate(${x} ${y})`,
  };
  const group = svg('g', attributes);
  if (click.label === 'background') {
    group.append(
      svg('circle', { r: RADIUS, fill: 'none', stroke: '#000', 'stroke-width': 4 }),
      svg('circle', { r: RADIUS, fill: 'none', stroke: '#fff', 'stroke-width': 2 }),
      svg('path', { d: `M-${RADIUS} 0H${RADIUS}M0 -${RADIUS}V${RADIUS}`, stroke: '#fff', 'stroke-width': 1.5 })
    );
  } else {
    group.append(svg('circle', { r: RADIUS, fill: color, stroke: '#000', 'stroke-width': 1.5 }));
  }
  return group;
}

/**
 * The markers of a click tool.
 *
 * @param {object} source
 * @param {Function} source.clicks () => the clicks to draw: {label, segment, instance, row, column, world, halfPixel}
 * @param {Function} source.colorOf (viewport, segment name) => a CSS colour
 * @param {Function} source.sopOf (imageId) => the SOP Instance UID of an image
 * @returns {{listen: Function, draw: Function}} listen() once; draw() after the clicks changed
 */
export function clickMarkers(source) {
  function drawOn(viewport) {
    const canvas = viewport && viewport.canvas;
    const holder = canvas && canvas.parentElement;
    if (!holder) {
      return;
    }
    let layer = holder.querySelector(':scope > svg[data-cy="labeling-click-markers"]');
    const clicks = source.clicks().filter(click => shows(viewport, click, source.sopOf));
    if (!clicks.length) {
      if (layer) {
        layer.replaceChildren();
      }
      return;
    }
    if (!layer) {
      layer = svg('svg', { 'data-cy': 'labeling-click-markers' });
      layer.style.cssText = 'position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none;z-index:2';
      holder.append(layer);
    }
    layer.replaceChildren(
      ...clicks.map(click => {
        const [x, y] = viewport.worldToCanvas(click.world);
        return marker(click, x, y, source.colorOf(viewport, click.segment));
      })
    );
  }

  function draw() {
    const engines = (window.cornerstone && window.cornerstone.getRenderingEngines()) || [];
    for (const viewport of engines.flatMap(engine => engine.getViewports())) {
      drawOn(viewport);
    }
  }

  function listen() {
    window.addEventListener(
      RENDERED,
      event => {
        const enabled = window.cornerstone && window.cornerstone.getEnabledElement(event.target);
        if (enabled && enabled.viewport) {
          drawOn(enabled.viewport);
        }
      },
      true
    );
  }

  return { listen, draw };
}
