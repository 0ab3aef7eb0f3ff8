"""The speaker-box editor of the page: the reference image with one box per speaker drawn on it.

A ``gr.HTML`` component with a template, scoped CSS and a little JavaScript (Gradio's own way of
writing a custom component, no build step). Its value is ``{"src": data URL of a preview,
"w": source width, "h": source height, "boxes": [[row_min, col_min, row_max, col_max], ...],
"show": bool}`` in source-image pixels (the official ``bbox`` convention). Dragging a box moves
it, dragging its corner handle resizes it; on release the new boxes become the value and a
``change`` event fires. Typed numbers set the value from Python and the template redraws.
Gradio has no box-annotation component of its own (``gradio_image_annotation`` is a third-party
package that does not install with Gradio 6 here), hence this one.
"""

from __future__ import annotations

import base64
import io

PREVIEW_WIDTH = 720     # the preview sent to the browser; boxes stay in source pixels

TEMPLATE = r"""
<div class="mt-stage" data-w="${value && value.w || 0}" data-h="${value && value.h || 0}">
${value && value.src
  ? `<img class="mt-img" src="${value.src}" draggable="false" alt="reference image">`
  : `<div class="mt-empty">Upload the reference image: the speakers' boxes are drawn on it.</div>`}
${value && value.src && value.show ? value.boxes.map((b, i) => `
  <div class="mt-box mt-box-${i + 1}" data-i="${i}" title="Speaker ${i + 1}: drag to move"
       style="left:${b[1] / value.w * 100}%;top:${b[0] / value.h * 100}%;width:${(b[3] - b[1]) / value.w * 100}%;height:${(b[2] - b[0]) / value.h * 100}%">
    <span class="mt-tag">Speaker ${i + 1}</span>
    <div class="mt-handle" data-i="${i}" title="drag to resize"></div>
  </div>`).join("") : ""}
</div>
"""

CSS = r"""
.mt-stage { position: relative; display: inline-block; max-width: 100%; line-height: 0; user-select: none; }
.mt-img { display: block; max-width: 100%; height: auto; border-radius: 6px; }
.mt-empty { line-height: 1.4; padding: 48px 16px; color: var(--body-text-color-subdued); border: 1px dashed var(--border-color-primary); border-radius: 6px; }
.mt-box { position: absolute; box-sizing: border-box; border: 3px solid #e5484d; background: rgba(229, 72, 77, .10); cursor: move; touch-action: none; }
.mt-box-2 { border-color: #3e63dd; background: rgba(62, 99, 221, .10); }
.mt-tag { position: absolute; left: 0; top: 0; line-height: 1.3; font-size: 12px; padding: 1px 6px; color: #fff; background: #e5484d; }
.mt-box-2 .mt-tag { background: #3e63dd; }
.mt-handle { position: absolute; right: -8px; bottom: -8px; width: 14px; height: 14px; background: #fff; border: 2px solid #222; border-radius: 3px; cursor: nwse-resize; }
"""

# Runs once when the component mounts; the listeners sit on the root element, so they survive
# the template re-rendering the image and boxes.
JS = r"""
let drag = null;
const MIN = 8;   // smallest box side, source pixels
element.addEventListener('pointerdown', (e) => {
  const box = e.target.closest('.mt-box');
  const v = props.value;
  if (!box || !v || !v.boxes) return;
  const img = element.querySelector('.mt-img');
  const r = img.getBoundingClientRect();
  const i = +box.dataset.i;
  drag = {i, resize: e.target.classList.contains('mt-handle'), x0: e.clientX, y0: e.clientY,
          box: v.boxes[i].slice(), sx: v.w / r.width, sy: v.h / r.height, el: box, cur: null};
  box.setPointerCapture(e.pointerId);
  e.preventDefault();
});
element.addEventListener('pointermove', (e) => {
  if (!drag) return;
  const v = props.value, b = drag.box.slice();
  const dx = (e.clientX - drag.x0) * drag.sx, dy = (e.clientY - drag.y0) * drag.sy;
  if (drag.resize) {
    b[2] = Math.min(v.h, Math.max(b[0] + MIN, b[2] + dy));
    b[3] = Math.min(v.w, Math.max(b[1] + MIN, b[3] + dx));
  } else {
    const h = b[2] - b[0], w = b[3] - b[1];
    b[0] = Math.min(v.h - h, Math.max(0, b[0] + dy));
    b[1] = Math.min(v.w - w, Math.max(0, b[1] + dx));
    b[2] = b[0] + h; b[3] = b[1] + w;
  }
  drag.cur = b.map(Math.round);
  const s = drag.el.style, c = drag.cur;
  s.left = c[1] / v.w * 100 + '%'; s.top = c[0] / v.h * 100 + '%';
  s.width = (c[3] - c[1]) / v.w * 100 + '%'; s.height = (c[2] - c[0]) / v.h * 100 + '%';
});
const release = () => {
  if (!drag) return;
  const d = drag; drag = null;
  if (!d.cur) return;
  const boxes = props.value.boxes.map((b) => b.slice());
  boxes[d.i] = d.cur;
  props.value = Object.assign({}, props.value, {boxes});
  trigger('change');
};
element.addEventListener('pointerup', release);
element.addEventListener('pointercancel', release);
"""


def preview_data_url(image, max_width: int = PREVIEW_WIDTH) -> str:
    """A JPEG data URL of the image, at most ``max_width`` wide (what the browser draws)."""
    img = image.convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, max(1, round(img.height * max_width / img.width))))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def editor_value(image=None, boxes=None, show: bool = True, src: str | None = None) -> dict | None:
    """The component's value for a PIL image (or its size and an existing preview ``src``)."""
    if image is None and src is None:
        return None
    value = {"src": src or preview_data_url(image), "boxes": [list(map(int, b)) for b in (boxes or [])],
             "show": bool(show)}
    if image is not None:
        value.update(w=image.width, h=image.height)
    return value


def make_box_editor(**kwargs):
    """The ``gr.HTML`` box editor (empty until an image is given)."""
    import gradio as gr

    return gr.HTML(None, html_template=TEMPLATE, css_template=CSS, js_on_load=JS, **kwargs)


__all__ = ["CSS", "JS", "TEMPLATE", "editor_value", "make_box_editor", "preview_data_url"]
