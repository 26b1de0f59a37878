"""The page's drawing canvas: a plain ``<canvas>`` in a ``gradio.HTML`` whose value is the strokes drawn on it.

The browser keeps the strokes as lists of points (canvas pixels) and sends them while the pen moves, at
most every :data:`SEND_EVERY_MS` (the first time that long after it touched down) and once more when it
lifts; Python draws them again with the same brush
(:func:`strokes_ink`). A stroke costs a few hundred bytes to send, where an image editor sends whole
images after each stroke.

The value is ``{"strokes": [[[x, y], ...], ...], "generation": n}``; the page bumps ``generation`` (a prop
of the component) when it clears the canvas or lays a new picture under it, and the browser then drops
its strokes.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from condistill.demo.inputs import BadInput

#: How often a moving pen sends its strokes, in milliseconds.
SEND_EVERY_MS = 40
#: The most points a page accepts (a minute of continuous drawing is a few thousand).
MAX_POINTS = 200_000

TEMPLATE = (
    '<div class="condistill-sheet" data-generation="${generation}" '
    'style="background-image: ${background ? `url(${background})` : \'none\'}">'
    '<canvas width="${size}" height="${size}"></canvas></div>'
)

CSS = (
    ".condistill-sheet {width: 100%; max-width: 512px; aspect-ratio: 1; background-color: #fff; "
    "background-size: 100% 100%; image-rendering: pixelated; border: 1px solid #999; touch-action: none}"
    ".condistill-sheet canvas {width: 100%; height: 100%; display: block; cursor: crosshair; touch-action: none}"
)

JS = """
const state = {strokes: [], drawing: false, last: 0, timer: null, generation: null};
const sheet = () => element.querySelector('.condistill-sheet');
const canvas = () => element.querySelector('canvas');
function fresh() {
  const g = sheet() && sheet().dataset.generation;
  if (g !== state.generation) { state.generation = g; state.strokes = []; }
}
function point(c, e) {
  const r = c.getBoundingClientRect();
  return [Math.round((e.clientX - r.left) * c.width / r.width * 10) / 10,
          Math.round((e.clientY - r.top) * c.height / r.height * 10) / 10];
}
function paint() {
  const c = canvas(); if (!c) return;
  const g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  g.lineWidth = props.brush; g.lineCap = 'round'; g.lineJoin = 'round'; g.strokeStyle = props.color;
  for (const s of state.strokes) {
    g.beginPath(); g.moveTo(s[0][0], s[0][1]);
    for (const p of s) g.lineTo(p[0], p[1]);
    if (s.length === 1) g.lineTo(s[0][0] + 0.01, s[0][1]);
    g.stroke();
  }
}
function send() {
  state.timer = null; state.last = performance.now();
  props.value = {strokes: state.strokes.map(s => s.slice()), generation: state.generation};
  trigger('change');
}
function soon() {
  if (state.timer) return;
  state.timer = setTimeout(send, Math.max(0, %(every)d - (performance.now() - state.last)));
}
element.addEventListener('pointerdown', e => {
  const c = canvas(); if (e.target !== c) return;
  fresh(); c.setPointerCapture(e.pointerId); state.drawing = true;
  state.strokes.push([point(c, e)]); paint(); state.last = performance.now();
});
element.addEventListener('pointermove', e => {
  if (!state.drawing) return;
  state.strokes[state.strokes.length - 1].push(point(canvas(), e)); paint(); soon();
});
const lift = () => {
  if (!state.drawing) return;
  state.drawing = false; if (state.timer) clearTimeout(state.timer); send();
};
element.addEventListener('pointerup', lift);
element.addEventListener('pointercancel', lift);
new MutationObserver(() => { fresh(); paint(); }).observe(element, {childList: true, subtree: true});
""" % {"every": SEND_EVERY_MS}


def empty(generation: int = 0) -> dict:
    return {"strokes": [], "generation": generation}


def strokes_ink(value, size: int, brush: float) -> np.ndarray:
    """The pixels the strokes of a canvas value cover, ``bool [size, size]``, drawn with a round brush
    ``brush`` pixels wide as the browser drew them."""
    strokes = (value or {}).get("strokes") or []
    if not isinstance(strokes, list):
        raise BadInput("the canvas sent strokes the page cannot read; reload the page")
    sheet = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(sheet)
    radius = brush / 2.0
    count = 0
    for stroke in strokes:
        try:
            points = [(float(x), float(y)) for x, y in stroke]
        except (TypeError, ValueError):
            raise BadInput("the canvas sent strokes the page cannot read; reload the page") from None
        count += len(points)
        if count > MAX_POINTS:
            raise BadInput(f"the drawing has more than {MAX_POINTS:,} points; clear the canvas")
        if len(points) > 1:
            draw.line(points, fill=255, width=max(1, round(brush)), joint="curve")
        for x, y in (points[0], points[-1]) if points else ():
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return np.asarray(sheet) >= 128
