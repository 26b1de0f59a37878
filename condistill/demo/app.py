"""The demo page (Gradio): one input for the students' condition, one column per student.

Each column redraws on its own whenever the input, the prompt, the seed or its settings change. Its
event keeps at most one call running and, while it runs, only the latest change waiting
(``trigger_mode="always_last"``): the output follows a pen without a queue of stale frames, and a slow
column (a 50-step conventional adapter) never holds back a fast one. The column events skip Gradio's
queue (``queue=False``), which took about 230 ms between a pen lifting and the call starting on this
2-core CPU (under 20 ms without it); each model's lock keeps its pipeline to one call at a time.
"""
from __future__ import annotations

import base64
import io
import os

import numpy as np
import torch
from PIL import Image

from condistill.data.record import Record
from condistill.demo import canvas
from condistill.demo.canvas import empty, strokes_ink
from condistill.demo.inputs import (BadInput, canvas_for, condition_from_upload, inpaint_condition, read_upload,
                                    sketch_to_edges)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never calls out

#: The element ids a browser (and the tests) find the page's parts by.
IDS = {"canvas": "condistill-canvas", "upload": "condistill-upload", "control": "condistill-control",
       "status": "condistill-status", "prompt": "condistill-prompt", "seed": "condistill-seed",
       "example": "condistill-example", "clear": "condistill-clear", "depth_map": "condistill-depth-map"}


def output_id(i: int) -> str:
    return f"condistill-output-{i}"


def time_id(i: int) -> str:
    return f"condistill-time-{i}"


def _warn(message: str) -> str:
    return f"**Could not use this input:** {message}"


class Page:
    """The page's logic without its widgets: turning the inputs into a condition and a column's image.

    ``picture`` is what an upload or an example laid down: an edge map under the canvas (edge), the photo
    to brush the hole on (inpaint, fitted to the training resolution), or the uploaded image (depth, sr).
    """

    def __init__(self, models):
        self.models = models
        first = models[0]
        self.condition = first.condition
        self.resolution = first.resolution
        self.canvas = canvas_for(self.resolution)
        self.draws = self.condition.name in ("edge", "inpaint")
        self.brush = self.canvas.brush if self.condition.name == "edge" else self.canvas.brush * 6
        #: column -> the last call it sampled: (control, prompt, steps, seed, guidance)
        self.last: dict[int, tuple] = {}
        #: column -> how many images it has sampled (shown with the time, so each update is told apart)
        self.updates: dict[int, int] = {}
        self._made = None  # (picture, depth_map, its condition): the last picture's condition

    def control(self, strokes, picture, depth_map: bool):
        """The condition ``[1, C, R, R]`` of the page's input, or None when there is none yet."""
        name = self.condition.name
        if name == "edge":
            ink = sketch_to_edges(strokes_ink(strokes, self.canvas.size, self.brush), self.resolution)
            return ink if picture is None else torch.maximum(ink, picture)
        if name == "inpaint":
            if picture is None:
                return None
            hole = sketch_to_edges(strokes_ink(strokes, self.canvas.size, self.brush), self.resolution)[0, 0]
            return inpaint_condition(self.condition, picture, hole.numpy() > 0.5)
        if picture is None:
            return None
        # depth, sr: made once per picture, not by every column on every prompt, seed or steps change (a photo's
        # depth runs the estimator)
        made = self._made
        if made is not None and made[0] is picture and made[1] == bool(depth_map):
            return made[2]
        if isinstance(picture, Record):  # an example scene: the depth it was rendered with
            control = self.condition.control_image(picture.image, depth=picture.depth)
        else:
            control = condition_from_upload(self.condition, picture, depth_map=bool(depth_map))
        self._made = (picture, bool(depth_map), control)
        return control

    def column(self, i: int, strokes, picture, depth_map, prompt, seed, steps, guidance):
        """Column ``i``'s outputs: (image, time text, control preview, status)."""
        import gradio as gr

        try:
            control = self.control(strokes, picture, depth_map)
        except BadInput as exc:
            return gr.skip(), gr.skip(), gr.skip(), _warn(str(exc))
        if control is None:
            return None, "", None, "Upload an image or pick an example scene to start."
        model = self.models[i]
        call = (control, prompt or "", int(steps), int(seed or 0), float(guidance))
        sample = model.generate(*call[:2], steps=call[2], seed=call[3], guidance=call[4])
        self.last[i] = call
        self.updates[i] = self.updates.get(i, 0) + 1
        label = (f"{sample.seconds * 1000:.0f} ms to sample · {int(steps)} step{'s' if int(steps) > 1 else ''} · "
                 f"update {self.updates[i]}")
        preview = self.condition.to_pil(control) if i == 0 else gr.skip()
        return sample.image, label, preview, "" if i == 0 else gr.skip()

    def _laid(self, picture, generation: int):
        """The outputs of laying ``picture`` down: (picture state, canvas update, status)."""
        import gradio as gr

        if not self.draws:
            return picture, gr.skip(), ""
        if self.condition.name == "edge":
            shown = Image.fromarray(np.where(picture[0, 0].numpy() > 0.5, 0, 255).astype(np.uint8))
        else:
            shown = picture
        shown = shown.resize((self.canvas.size, self.canvas.size), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        shown.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        return picture, gr.HTML(value=empty(generation), background=url, generation=generation), ""

    def upload(self, path, generation):
        """An uploaded file laid down (edge: its edges, as training found them, under the canvas; inpaint: the
        photo to brush; depth, sr: the image); a refusal goes to the status and changes nothing."""
        import gradio as gr

        if path is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            photo = read_upload(path)
            picture = self._picture(photo)
        except BadInput as exc:  # (picture, canvas, status, generation): only the status changes
            return gr.skip(), gr.skip(), _warn(str(exc)), gr.skip()
        return (*self._laid(picture, int(generation) + 1), int(generation) + 1)

    def _picture(self, photo):
        if self.condition.name == "edge":
            return condition_from_upload(self.condition, photo)
        if self.condition.name == "inpaint":
            from condistill.data.images import fit_record

            return fit_record(Record(image=photo), self.resolution)[0].image
        return photo

    def example(self, index, generation):
        """A held-out synthetic scene of the embedded world laid down like an upload (depth: the photo with the depth
        it was rendered with; sr: a quarter-size copy)."""
        import gradio as gr

        from condistill.world.scenes import generate_scene

        scene = generate_scene(int(index or 0), "heldout", resolution=self.resolution)
        if self.condition.name == "depth":
            return Record(image=scene.image, depth=scene.depth), gr.skip(), "", int(generation) + 1
        if self.condition.name == "sr":  # a quarter-size copy, the low-resolution input
            low = scene.image.resize((max(1, self.resolution // 4),) * 2, Image.Resampling.BICUBIC)
            return low, gr.skip(), "", int(generation) + 1
        return (*self._laid(self._picture(scene.image), int(generation) + 1), int(generation) + 1)

    def clear(self, generation):
        """An empty canvas with nothing under it."""
        import gradio as gr

        generation = int(generation) + 1
        canvas = gr.HTML(value=empty(generation), background="", generation=generation) if self.draws else gr.skip()
        return None, canvas, "", generation


def build(models, *, title: str = "condistill demo"):
    """The ``gradio.Blocks`` page for ``models`` (:class:`~condistill.demo.models.DemoModel`, one condition);
    its :class:`Page` is ``demo.condistill_page``."""
    import gradio as gr

    page = Page(models)
    name = page.condition.name
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}: {name}\n" + _instructions(name, page.resolution))
        picture = gr.State(None)
        generation = gr.State(0)
        with gr.Row():
            with gr.Column(scale=2):
                strokes = gr.HTML(value=empty(), html_template=canvas.TEMPLATE, css_template=canvas.CSS,
                                  js_on_load=canvas.JS, size=page.canvas.size, brush=page.brush,
                                  color="#000000" if name == "edge" else "rgba(255, 0, 255, 0.55)", background="",
                                  generation=0, visible=page.draws, elem_id=IDS["canvas"])
                upload = gr.File(label="upload an image" if name != "sr" else "upload a low-resolution image",
                                 type="filepath", elem_id=IDS["upload"])  # any file: ours says what is wrong
                depth_map = gr.Checkbox(label="the image is a depth map (grey, near is bright)", value=False,
                                        visible=name == "depth", elem_id=IDS["depth_map"])
                with gr.Row():
                    example_index = gr.Number(value=0, precision=0, label="held-out scene", minimum=0)
                    example = gr.Button("example scene", elem_id=IDS["example"])
                    clear = gr.Button("clear", elem_id=IDS["clear"])
                prompt = gr.Textbox(label="prompt", value="", elem_id=IDS["prompt"])
                seed = gr.Number(value=0, precision=0, label="seed", minimum=0, elem_id=IDS["seed"])
                status = gr.Markdown("", elem_id=IDS["status"])
                control = gr.Image(label="what the student sees", format="png", interactive=False,
                                   elem_id=IDS["control"], height=160)
            columns = []
            for i, model in enumerate(models):
                with gr.Column(scale=2):
                    gr.Markdown(f"### {model.label}\n{model.describe()}")
                    out = gr.Image(label="output", format="png", interactive=False, elem_id=output_id(i), height=360)
                    timing = gr.Markdown("", elem_id=time_id(i))
                    steps = gr.Radio(choices=list(model.steps), value=model.steps[0], label="steps")
                    guidance = gr.Slider(1.0, 8.0, value=model.guidance, step=0.5, label="guidance")
                    columns.append((out, timing, steps, guidance))

        laid = [picture, strokes, status, generation]
        upload.change(page.upload, [upload, generation], laid, show_progress="hidden")
        example.click(page.example, [example_index, generation], laid, show_progress="hidden")
        clear.click(page.clear, [generation], laid, show_progress="hidden")
        for i, (out, timing, steps, guidance) in enumerate(columns):
            triggers = [strokes.change, picture.change, depth_map.change, prompt.change, seed.change, steps.change,
                        guidance.change]
            gr.on(triggers, lambda *a, i=i: page.column(i, *a), [strokes, picture, depth_map, prompt, seed, steps,
                                                                  guidance],
                  [out, timing, control, status], trigger_mode="always_last", concurrency_limit=1,
                  concurrency_id=f"column-{i}", show_progress="hidden", queue=False)
    demo.condistill_page = page
    return demo


def _instructions(name: str, resolution: int) -> str:
    what = {
        "edge": "Draw edges on the canvas (the pen is one training pixel wide) or upload a photo: its edges, "
                "found as in training, are laid under the canvas to draw over.",
        "depth": "Upload a photo (its depth is estimated as in training) or a depth map, or pick an example scene.",
        "sr": "Upload a low-resolution image; it is brought up to the training size and sharpened.",
        "inpaint": "Upload a photo (or pick an example scene), then brush the hole to fill.",
    }.get(name, "Upload an image.")
    return f"{what} The images follow every change; the student was trained at {resolution} px."
