"""The demo page in a real browser: headless Chromium from the system's packages, driven by Selenium, against the
page served on a free loopback port with tiny trained students. A drawn stroke, an upload and a brushed hole each
give the image the Python API gives for the condition the page made (to 1/255: the page sends lossless PNG)."""
import os

import numpy as np
import pytest
import torch

from browser import CHROMIUM, DRIVER, browser, fetch_image, free_port, image_src, open_page, stroke, text, upload, wait_for

pytestmark = pytest.mark.slow

if not (CHROMIUM and DRIVER):
    if os.environ.get("CONDISTILL_REQUIRE_BROWSER"):
        raise RuntimeError("the browser tests need chromium and chromium-driver (apt-get install chromium "
                           "chromium-driver); CI installs them")
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def driver():
    d = browser()
    yield d
    d.quit()


@pytest.fixture()
def serve():
    from condistill.demo import launch

    served = []

    def start(*runs):
        demo, url = launch([str(r) for r in runs], port=free_port(), block=False)
        served.append(demo)
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        return demo, url

    yield start
    for demo in served:
        demo.close()


def _python_api(model, call) -> np.ndarray:
    """What the documented Python API gives for the page's last call (a fresh load_adapter pipeline)."""
    from condistill import load_adapter

    control, prompt, steps, seed, guidance = call
    pipe = load_adapter(model.source)
    pipe.set_progress_bar_config(disable=True)
    if model.conventional:
        pipe.scheduler = model.pipe.scheduler
    args = {**pipe.condistill_defaults, "num_inference_steps": steps, "guidance_scale": guidance,
            "generator": torch.Generator().manual_seed(seed)}
    if "strength" in args:
        image = pipe(prompt, image=pipe.condistill_condition.init_image(control), control_image=control, **args)
    else:
        image = pipe(prompt, image=control, **args)
    return np.asarray(image.images[0])


def _new_output(driver, column: int, before: str | None, timeout: float = 120) -> str:
    return wait_for(lambda: (src := image_src(driver, f"condistill-output-{column}")) and src != before and src,
                    timeout, f"column {column}'s image")


def _settled(driver, demo, column: int = 0, timeout: float = 120) -> np.ndarray:
    """The column's image once the page is idle (no newer call is waiting), as the browser shows it."""
    page = demo.condistill_page
    src = _new_output(driver, column, None, timeout)
    for _ in range(50):
        last = page.last.get(column)
        src = image_src(driver, f"condistill-output-{column}")
        wait_for(lambda: text(driver, f"condistill-time-{column}"), timeout, "the time")
        import time

        time.sleep(1.0)
        if page.last.get(column) is last and image_src(driver, f"condistill-output-{column}") == src:
            return fetch_image(src)
    raise AssertionError("the page never settled")


def test_drawing_edges_gives_the_python_api_image_and_a_bad_upload_a_message(driver, serve, demo_runs, tmp_path):
    demo, url = serve(demo_runs["edge"], demo_runs["edge-baseline"])
    open_page(driver, url)
    stroke(driver, [(-120, -60), (60, -60), (60, 80)])
    shown = _settled(driver, demo)
    page = demo.condistill_page
    control = page.last[0][0]
    assert control.shape == (1, 3, 64, 64) and 40 <= control[0, 0].sum() <= 120  # an L of ~45 + ~35 pixels
    assert np.abs(shown.astype(int) - _python_api(page.models[0], page.last[0])).max() <= 1
    preview = fetch_image(image_src(driver, "condistill-control"))
    assert np.array_equal(preview[..., 0] > 127, control[0, 0].numpy() > 0.5)  # the edges the student saw
    assert "ms to sample" in text(driver, "condistill-time-0")

    # the conventional adapter beside it samples too, 50 DDIM steps with guidance 4
    baseline = _settled(driver, demo, column=1)
    assert page.last[1][2:] == (50, 0, 4.0)
    assert np.abs(baseline.astype(int) - _python_api(page.models[1], page.last[1])).max() <= 1

    stroke(driver, [(-100, 100), (100, 100)])  # a second stroke adds to the first
    wait_for(lambda: page.last[0][0].sum() > control.sum() + 30, 120, "the second stroke")
    shown = _settled(driver, demo)
    assert np.abs(shown.astype(int) - _python_api(page.models[0], page.last[0])).max() <= 1

    corrupt = tmp_path / "holiday.png"
    corrupt.write_bytes(b"not an image, whatever its name says")
    upload(driver, corrupt)
    message = wait_for(lambda: text(driver, "condistill-status"), 60, "the status message")
    assert "holiday.png is not an image this demo can read" in message and "Traceback" not in message


@pytest.mark.parametrize("name", ["sr", "depth-t2i"])
def test_an_upload_or_an_example_gives_the_python_api_image(driver, serve, demo_runs, tmp_path, name):
    from condistill.world.scenes import generate_scene

    demo, url = serve(demo_runs[name])
    open_page(driver, url)
    if name == "sr":
        photo = tmp_path / "photo.png"
        generate_scene(7, "heldout", resolution=40).image.save(photo)
        upload(driver, photo)  # a low-resolution image
    else:  # a held-out scene's depth map (a photo's depth needs the estimator's weights, absent offline)
        driver.find_element("css selector", "#condistill-example").click()
    shown = _settled(driver, demo)
    page = demo.condistill_page
    assert np.abs(shown.astype(int) - _python_api(page.models[0], page.last[0])).max() <= 1


def test_a_brushed_hole_is_inpainted_as_the_python_api_does(driver, serve, demo_runs, tmp_path):
    from condistill.world.scenes import generate_scene

    demo, url = serve(demo_runs["inpaint-lora"])
    open_page(driver, url)
    photo = tmp_path / "photo.png"
    generate_scene(2, "heldout", resolution=64).image.save(photo)
    upload(driver, photo)
    wait_for(lambda: "url(" in driver.find_element("css selector", ".condistill-sheet").get_attribute("style"), 60,
             "the photo under the canvas")
    stroke(driver, [(-40, 0), (40, 0)])
    shown = _settled(driver, demo)
    page = demo.condistill_page
    control = page.last[0][0]
    assert control.shape == (1, 4, 64, 64) and 0 < control[0, 3].mean() < 0.5  # a brushed hole, not the whole image
    assert np.abs(shown.astype(int) - _python_api(page.models[0], page.last[0])).max() <= 1
