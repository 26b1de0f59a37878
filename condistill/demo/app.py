"""The demo page (Gradio): one input for the students' condition, one column per student.

Each column redraws on its own whenever the input, the prompt, the seed or its settings change. Its
event keeps at most one call running and, while it runs, only the latest change waiting
(``trigger_mode="always_last"``): the output follows a pen without a queue of stale frames, and a slow
column (a 50-step conventional adapter) never holds back a fast one.
"""
from __future__ import annotations

import os

import numpy as np

from condistill.demo.inputs import (BadInput, canvas_for, condition_from_upload, edges_layer, inpaint_condition,
                                    layers_ink, read_upload, sketch_to_edges)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never calls out

#: The element ids a browser (and the tests) find the page's parts by.
IDS = {"canvas": "condistill-canvas", "upload": "condistill-upload", "control": "condistill-control",
       "status": "condistill-status", "prompt": "condistill-prompt", "seed": "condistill-seed",
       "example": "condistill-example", "depth_map": "condistill-depth-map"}


def output_id(i: int) -> str:
    return f"condistill-output-{i}"


def time_id(i: int) -> str:
    return f"condistill-time-{i}"


def _warn(message: str) -> str:
    return f"**Could not use this input:** {message}"


class Page:
    """The page's logic without its widgets: turning the inputs into a condition and a column's image."""

    def __init__(self, models):
        self.models = models
        first = models[0]
        self.condition = first.condition
        self.resolution = first.resolution
        self.canvas = canvas_for(self.resolution)

    def control(self, sketch, image, depth_map: bool):
        """The condition ``[1, C, R, R]`` of the page's input, or None when there is none yet."""
        name = self.condition.name
        if name == "edge":
            if sketch is None:
                return None
            layers = sketch.get("layers") or []
            size = (self.canvas.size, self.canvas.size)
            return sketch_to_edges(layers_ink(layers, size), self.resolution)
        if name == "inpaint":
            if sketch is None or sketch.get("background") is None:
                return None
            background = np.asarray(sketch["background"])[..., :3]
            from PIL import Image

            photo = Image.fromarray(np.ascontiguousarray(background))
            return inpaint_condition(self.condition, photo, layers_ink(sketch.get("layers"), photo.size))
        if image is None:
            return None
        return condition_from_upload(self.condition, image, depth_map=bool(depth_map))

    def column(self, i: int, sketch, image, depth_map, prompt, seed, steps, guidance):
        """Column ``i``'s outputs: (image, time text, control preview, status)."""
        import gradio as gr

        try:
            control = self.control(sketch, image, depth_map)
        except BadInput as exc:
            return gr.skip(), gr.skip(), gr.skip(), _warn(str(exc))
        if control is None:
            return None, "", None, "Draw, upload or pick an example to start."
        model = self.models[i]
        sample = model.generate(control, prompt or "", steps=int(steps), seed=int(seed or 0), guidance=float(guidance))
        label = f"{sample.seconds * 1000:.0f} ms to sample · {int(steps)} step{'s' if int(steps) > 1 else ''}"
        preview = self.condition.to_pil(control) if i == 0 else gr.skip()
        return sample.image, label, preview, "" if i == 0 else gr.skip()

    def load_upload(self, upload):
        """An uploaded file read for the page: (image state, status), or the refusal in the status."""
        import gradio as gr

        if upload is None:
            return gr.skip(), ""
        try:
            return read_upload(upload), ""
        except BadInput as exc:
            return gr.skip(), _warn(str(exc))

    def upload_to_canvas(self, upload):
        """edge: an uploaded photo's edges (as training made them) laid on the canvas to draw over;
        inpaint: the photo as the editor's background, to brush the hole on."""
        import gradio as gr

        if upload is None:
            return gr.skip(), ""
        try:
            photo = read_upload(upload)
            if self.condition.name == "inpaint":
                fitted = self._fit(photo)
                return {"background": np.asarray(fitted), "layers": [], "composite": np.asarray(fitted)}, ""
            edges = condition_from_upload(self.condition, photo)
        except BadInput as exc:
            return gr.skip(), _warn(str(exc))
        return self._canvas_value(edges), ""

    def _fit(self, photo):
        from condistill.data.images import fit_record
        from condistill.data.record import Record

        return fit_record(Record(image=photo), self.canvas.size)[0].image

    def _canvas_value(self, edges) -> dict:
        layer = edges_layer(edges, self.canvas.size)
        white = np.full((self.canvas.size, self.canvas.size, 3), 255, dtype=np.uint8)
        composite = white.copy()
        composite[layer[..., 3] > 0] = 0
        return {"background": white, "layers": [layer], "composite": composite}

    def example(self, index):
        """A held-out synthetic scene (the embedded world's): on the canvas (edge, inpaint) or as the image."""
        from condistill.world.scenes import generate_scene

        scene = generate_scene(int(index or 0), "heldout", resolution=self.resolution)
        if self.condition.name == "edge":
            return self._canvas_value(self.condition.control_image(scene.image)), None
        if self.condition.name == "inpaint":
            fitted = self._fit(scene.image)
            return {"background": np.asarray(fitted), "layers": [], "composite": np.asarray(fitted)}, None
        if self.condition.name == "depth":
            from PIL import Image

            return None, Image.fromarray((np.clip(scene.depth, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
        return None, scene.image


def build(models, *, title: str = "condistill demo"):
    """The ``gradio.Blocks`` page for ``models`` (:class:`~condistill.demo.models.DemoModel`, one condition)."""
    import gradio as gr

    page = Page(models)
    name = page.condition.name
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}: {name}\n" + _instructions(name, page.resolution))
        image_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                sketch = upload = None
                if name in ("edge", "inpaint"):
                    brush = gr.Brush(default_size=page.canvas.brush if name == "edge" else page.canvas.brush * 6,
                                     colors=["#000000"] if name == "edge" else ["#ff00ff"], color_mode="fixed")
                    value = page._canvas_value(np.zeros((1, 3, page.resolution, page.resolution), np.float32)) \
                        if name == "edge" else None
                    sketch = gr.ImageEditor(value=value, label="draw the edges" if name == "edge" else
                                            "brush the hole", type="numpy", image_mode="RGBA", format="png",
                                            canvas_size=(page.canvas.size, page.canvas.size), fixed_canvas=name == "edge",
                                            brush=brush, eraser=gr.Eraser(default_size=page.canvas.brush * 2),
                                            transforms=(), layers=False, sources=(), elem_id=IDS["canvas"])
                upload = gr.File(label="upload an image" if name != "sr" else "upload a low-resolution image",
                                 file_types=["image"], type="filepath", elem_id=IDS["upload"])
                depth_map = gr.Checkbox(label="the image is a depth map (grey, near is bright)", value=False,
                                        visible=name == "depth", elem_id=IDS["depth_map"])
                with gr.Row():
                    example_index = gr.Number(value=0, precision=0, label="held-out scene", minimum=0)
                    example = gr.Button("example scene", elem_id=IDS["example"])
                prompt = gr.Textbox(label="prompt", value="", elem_id=IDS["prompt"])
                seed = gr.Number(value=0, precision=0, label="seed", minimum=0, elem_id=IDS["seed"])
                status = gr.Markdown("", elem_id=IDS["status"])
                control = gr.Image(label="what the student sees", format="png", interactive=False,
                                   elem_id=IDS["control"], height=160)
            columns = []
            for i, model in enumerate(models):
                with gr.Column(scale=2):
                    gr.Markdown(f"### {model.label}\n{model.describe()}")
                    out = gr.Image(label="output", format="png", interactive=False, elem_id=output_id(i))
                    timing = gr.Markdown("", elem_id=time_id(i))
                    steps = gr.Radio(choices=list(model.steps), value=model.steps[0], label="steps")
                    guidance = gr.Slider(1.0, 8.0, value=model.guidance, step=0.5, label="guidance")
                    columns.append((out, timing, steps, guidance))

        inputs = [sketch or gr.State(None), image_state, depth_map, prompt, seed]
        if name in ("edge", "inpaint"):
            upload.upload(page.upload_to_canvas, [upload], [sketch, status], show_progress="hidden")
            example.click(lambda i: page.example(i)[0], [example_index], [sketch], show_progress="hidden")
        else:
            upload.upload(page.load_upload, [upload], [image_state, status], show_progress="hidden")
            example.click(lambda i: page.example(i)[1], [example_index], [image_state], show_progress="hidden")
        for i, (out, timing, steps, guidance) in enumerate(columns):
            triggers = [prompt.change, seed.change, steps.change, guidance.change, image_state.change,
                        depth_map.change]
            if sketch is not None:
                triggers.append(sketch.change)
            gr.on(triggers, lambda *a, i=i: page.column(i, *a), inputs + [steps, guidance],
                  [out, timing, control, status], trigger_mode="always_last", concurrency_limit=1,
                  concurrency_id=f"column-{i}", show_progress="hidden")
    return demo


def _instructions(name: str, resolution: int) -> str:
    what = {
        "edge": "Draw edges on the canvas (the pen is one training pixel wide) or upload a photo: its edges, "
                "found as in training, are laid on the canvas to draw over.",
        "depth": "Upload a photo (its depth is estimated as in training) or a depth map, or pick an example scene.",
        "sr": "Upload a low-resolution image; it is brought up to the training size and sharpened.",
        "inpaint": "Upload a photo, then brush the hole to fill.",
    }.get(name, "Upload an image.")
    return f"{what} The images follow every change; the student was trained at {resolution} px."
