"""The web app (`a1-jax app`): one server for the module, started as a user starts it (tiny random weights, a free
127.0.0.1 port), driven by `gradio_client` and by a real headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium). Generations are the slow part (about a minute each on 2 quiet cores): one through
the API, one in the browser, one cancelled after its first denoising step; the error paths fail in seconds.

`A1_JAX_APP_SCREENSHOT=docs/app.png pytest tests/test_app.py -k browser` refreshes the README's screenshot."""

import json
import os
import pathlib
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import wave

import cv2
import gradio_client  # the test extra brings it, with gradio and selenium
import numpy as np
import pytest
from selenium import webdriver

from a1_jax.cli import build_parser, main
from a1_jax.io.audio import stream_durations
from a1_jax.io.video import probe_video, write_video
from a1_jax.progress import Cancelled, Stages
from a1_jax.sampling.preflight import AnimateRequest


REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_SECONDS = 10  # the server's --max-seconds: a longer driving video is refused
MAX_UPLOAD_MB = 2  # the server's --max-upload-mb: the examples fit (under 0.4 MB)
STEPS = 2  # every generation here: the compiled denoising loop is shared
FRAMES = 12  # --max-frames of the generations: one second of the example clip
START_SECONDS = 1200  # building the tiny networks, cold, on a loaded 2-core machine
RUN_SECONDS = 1800  # one generation, cold, under load (about a minute on 2 quiet cores)
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")  # Debian's, which .ci/run installs


# ------------------------------------------------------------------------------------------------ the server
class AppServer:
    """`python -m a1_jax app` in a subprocess; its stdout lines (one JSON object per request) are collected."""

    def __init__(self, tmp: pathlib.Path):
        with socket.socket() as probe:  # a free port on the loopback interface
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.tmp = tmp / "server_tmp"  # the server's TMPDIR: its private folders are made, and must vanish, here
        self.tmp.mkdir()
        self.stderr_path = tmp / "server.err"
        env = {**os.environ, "TMPDIR": str(self.tmp), "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "a1_jax", "app", "--port", str(self.port), "--max-seconds", str(MAX_SECONDS),
             "--max-upload-mb", str(MAX_UPLOAD_MB)],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "w"), text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with open(self.stderr_path.with_suffix(".out"), "w") as log:  # kept for a failure's post-mortem
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                self.lines.put(line.rstrip("\n"))

    def wait_until_serving(self) -> None:
        started = time.monotonic()
        while "serving" not in self.stderr_path.read_text():
            assert self.process.poll() is None, self.stderr_path.read_text()
            assert time.monotonic() - started < START_SECONDS, "the server did not start"
            time.sleep(1)

    def next_request(self, timeout: float = 60) -> dict:
        """The server's log line of the next request it finished."""
        while True:
            line = self.lines.get(timeout=timeout)
            if line.startswith('{"request"'):
                return json.loads(line)["request"]

    def sessions(self) -> set[str]:
        return {path.name for path in self.tmp.glob("a1_jax_app_*/session-*")}

    def stop(self) -> dict:
        """SIGTERM, as a service manager stops it; the last stdout line is its summary."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        time.sleep(0.5)  # the reader thread drains stdout
        lines = []
        while not self.lines.empty():
            lines.append(self.lines.get())
        return json.loads(lines[-1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = AppServer(tmp_path_factory.mktemp("app"))
    try:
        app.wait_until_serving()
        yield app
    finally:
        if app.process.poll() is None:
            summary = app.stop()
            assert app.process.returncode == 0 and summary["ok"], summary
            assert not list(app.tmp.iterdir()), "the server left its folders behind"
        # No traceback but Gradio's own, logged when it refuses a path a client named (test_a_client_cannot_...).
        tracebacks = app.stderr_path.read_text().split("Traceback")[1:]
        assert all("gradio.exceptions.InvalidPathError" in text for text in tracebacks), app.stderr_path.read_text()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, examples):
    """Files a user might pick by mistake, with the names the CLI and the page both see."""
    folder = tmp_path_factory.mktemp("bad")
    cv2.imwrite(str(folder / "grey.png"), np.full((480, 720, 3), 128, np.uint8))  # no face
    (folder / "notes.png").write_text("these are notes, not a picture\n")  # not an image
    (folder / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4096))  # not a video
    frame = cv2.cvtColor(cv2.imread(examples["portrait"]), cv2.COLOR_BGR2RGB)[:288, :288]
    write_video(str(folder / "long.mp4"), [frame] * (12 * (MAX_SECONDS + 1)), fps=12)  # 11 s
    with wave.open(str(folder / "long.wav"), "wb") as sound:  # 11 s of quiet noise
        sound.setnchannels(1), sound.setsampwidth(2), sound.setframerate(16000)
        sound.writeframes(np.random.default_rng(0).integers(-300, 300, 16000 * (MAX_SECONDS + 1), np.int16).tobytes())
    return folder


def _cli_error(folder: pathlib.Path, monkeypatch, capsys, ref: str, driving: str) -> str:
    """What `a1-jax animate` says for these files (run where they lie, so it names them as the page does)."""
    monkeypatch.chdir(folder)
    code = main(["animate", "--ref", ref, "--driving", driving, "--out", "out.mp4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    prefix = "a1-jax: error: "
    assert err.startswith(prefix), err
    return err[len(prefix):]


# --------------------------------------------------------------------------------------------- cheap checks
def test_the_request_has_the_cli_defaults():
    """One set of defaults: the app's request and `a1-jax animate`'s flags must not drift apart."""
    args = build_parser().parse_args(["animate", "--out", "x.mp4"])
    assert AnimateRequest.from_args(args) == AnimateRequest(out="x.mp4")
    assert build_parser().parse_args(["app"]).host == "127.0.0.1"


def test_a_cancelled_stage_stops_at_its_next_progress_point():
    shown = []
    stages = Stages("test", enabled=False, listener=lambda changed: shown.append(changed.status))
    with stages("denoise"):
        stages.advance(1, 10, "steps")
        assert shown == ["denoise", "denoise 1/10 steps"]  # the listener (the page's progress) sees each change
        stages.cancel()
        with pytest.raises(Cancelled):
            stages.advance(2, 10, "steps")
    assert stages.cancelled and stages.cancelled_at == "denoise 2/10 steps"


def test_session_folders_go_when_the_session_ends(tmp_path):
    from a1_jax.app.server import Sessions

    uploads = tmp_path / "uploads"
    shared, own, example = (uploads / name / "portrait.png" for name in ("hash1", "hash2", "hash3"))
    for path in (shared, own, example):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    sessions = Sessions(str(tmp_path), idle_seconds=3600)
    sessions.keep.add(str(example))
    with sessions.request("x", [str(shared)]):
        pass
    with sessions.request("a", [str(shared), str(own), str(example)]) as first:
        pathlib.Path(first, "out.mp4").write_bytes(b"x")
        sessions.close("a")  # the page closed while its request runs: the folder waits for the request
        assert os.path.exists(first) and own.exists()
    assert not os.path.exists(first) and sessions.open == 1
    assert not own.parent.exists()  # its upload went with it
    assert shared.exists() and example.exists()  # still used by session x; the example serves everyone
    sessions.close("x")
    assert not shared.exists() and example.exists() and sessions.open == 0
    with sessions.request("b") as second:
        pass
    assert os.path.exists(second)
    sessions.idle_seconds = 0  # an API client that never came back
    with sessions.request("c"):
        assert not os.path.exists(second)  # swept when the next request starts
    assert sessions.open == 1


# ------------------------------------------------------------------------------------------ through the API
def test_the_server_listens_on_127_0_0_1_only(server):
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in pathlib.Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port = local.split(":")
            if int(port, 16) == server.port and state == "0A":  # LISTEN
                listening.append(address)
    assert listening == ["0100007F"], listening  # 127.0.0.1, nothing on 0.0.0.0 or ::


@pytest.mark.parametrize("ref, driving", [
    ("grey.png", "driving.mp4"),  # no face
    ("notes.png", "driving.mp4"),  # not an image
    ("portrait.png", "broken.mp4"),  # a corrupt video
])
def test_user_errors_come_back_as_the_cli_sentence(server, client, bad_inputs, examples, monkeypatch, capsys, ref,
                                                   driving):
    for name, source in (("portrait.png", examples["portrait"]), ("driving.mp4", examples["driving"])):
        if not (bad_inputs / name).exists():
            shutil.copy(source, bad_inputs / name)
    expected = _cli_error(bad_inputs, monkeypatch, capsys, ref, driving)
    with pytest.raises(gradio_client.exceptions.AppError) as raised:
        client.predict(portrait=gradio_client.handle_file(str(bad_inputs / ref)),
                       driving=gradio_client.handle_file(str(bad_inputs / driving)), api_name="/animate")
    assert str(raised.value) == expected
    logged = server.next_request()
    assert logged == {"error": expected, "user_error": True, "ok": False}


@pytest.mark.parametrize("source", ["driving", "audio", "text"])
def test_a_motion_source_over_the_limit_is_refused(server, client, bad_inputs, examples, source):
    """--max-seconds holds for each kind of source, checked before the source's work (landmarks, recognition)."""
    given = {"driving": gradio_client.handle_file(str(bad_inputs / "long.mp4")),
             "audio": gradio_client.handle_file(str(bad_inputs / "long.wav")),
             "text": "The quick brown fox jumps over the lazy dog, again and again, all afternoon long. " * 4}[source]
    with pytest.raises(gradio_client.exceptions.AppError) as raised:
        client.predict(portrait=gradio_client.handle_file(examples["portrait"]), api_name="/animate",
                       **{source: given})
    what = {"driving": "long.mp4", "audio": "long.wav", "text": "the spoken text"}[source]
    assert re.fullmatch(rf"{what} lasts (\d+\.\d) s; this server animates at most {MAX_SECONDS} s of motion",
                        str(raised.value)), str(raised.value)
    assert float(re.search(r"lasts (\S+) s", str(raised.value))[1]) > MAX_SECONDS
    assert server.next_request()["user_error"]


def test_an_upload_over_the_limit_is_refused(server, tmp_path):
    import httpx

    def upload(megabytes: float) -> httpx.Response:
        data = np.random.default_rng(0).bytes(int(megabytes * 1e6))
        return httpx.post(f"{server.url}gradio_api/upload", files={"files": ("big.mp4", data)}, timeout=60)

    assert upload(MAX_UPLOAD_MB * 0.9).status_code == 200
    refused = upload(MAX_UPLOAD_MB * 1.1)
    assert refused.status_code == 413, (refused.status_code, refused.text)


def test_a_client_cannot_name_a_server_path(server):
    """Inputs are uploads: a file path in the request is refused before the function runs."""
    import httpx

    data = [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, None, None, None, STEPS, 3.0, 0, 12,
            False, FRAMES]
    event = httpx.post(f"{server.url}gradio_api/call/animate", json={"data": data}, timeout=30).json()["event_id"]
    stream = httpx.get(f"{server.url}gradio_api/call/animate/{event}", timeout=60).text
    assert "event: error" in stream and "event: complete" not in stream, stream
    with pytest.raises(queue.Empty):
        server.next_request(timeout=2)  # the animation never started


def test_the_api_animates_the_example_while_others_wait_their_turn(server, client, examples):
    """The README's three lines: video, preview, summary (and the control video). A second client's request waits in
    the queue, sees its place, and is cancelled there without running."""
    job = client.submit(portrait=gradio_client.handle_file(examples["portrait"]),
                        driving=gradio_client.handle_file(examples["driving"]), max_frames=FRAMES, steps=STEPS,
                        api_name="/animate")
    other = gradio_client.Client(server.url, verbose=False)
    waiting = other.submit(portrait=gradio_client.handle_file(examples["portrait"]),
                           driving=gradio_client.handle_file(examples["driving"]), max_frames=FRAMES, steps=STEPS,
                           api_name="/animate")
    started = time.monotonic()
    while waiting.status().code != gradio_client.utils.Status.IN_QUEUE:
        assert time.monotonic() - started < 120, waiting.status()
        time.sleep(0.5)
    assert waiting.status().rank == 0 and not job.done()  # first in line behind the running one
    waiting.cancel()

    video, preview, summary, control = job.result(timeout=RUN_SECONDS)
    info = probe_video(video)
    assert (info.num_frames, info.fps, info.height, info.width) == (FRAMES, 12, 480, 720)
    assert stream_durations(video)["audio"] == pytest.approx(FRAMES / 12, abs=0.05)  # the clip's own sound
    assert probe_video(preview).num_frames == FRAMES and probe_video(preview).width == 3 * 720 + 480
    assert probe_video(control).num_frames == FRAMES
    assert summary["ok"] and summary["frames"] == FRAMES and summary["random_weights"] and summary["steps"] == STEPS
    assert summary["out"] == "animated.mp4" and summary["ref"] == "portrait.png"  # no server folder shown
    assert server.next_request() == summary  # the server's log line; the cancelled one never ran


def test_cancel_stops_between_denoising_steps(server, client, examples):
    steps = 100  # a loop far longer than the cancel takes to arrive (one step: 0.2-1 s here), so it lands inside
    job = client.submit(portrait=gradio_client.handle_file(examples["portrait"]),
                        driving=gradio_client.handle_file(examples["driving"]), max_frames=FRAMES, steps=steps,
                        api_name="/animate")
    started = time.monotonic()
    while True:
        progress = job.status().progress_data or []
        if any(unit.desc == "denoise" and unit.index for unit in progress):
            break
        assert not job.done() and time.monotonic() - started < RUN_SECONDS, job.status()
        time.sleep(0.2)
    job.cancel()
    logged = server.next_request(timeout=300)
    assert logged["cancelled"] and not logged["ok"] and logged["out"] is None
    where = logged["error"].removeprefix("cancelled at denoise ").removesuffix(f"/{steps} steps: nothing was written")
    assert 1 <= int(where) < steps, logged["error"]  # stopped inside the loop, between two steps
    assert "decode" not in logged["stage_seconds"]


# -------------------------------------------------------------------------------------------- in a browser
@pytest.fixture
def browser(monkeypatch):
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_download(*args, **kwargs):
        raise AssertionError("Selenium Manager was asked for a browser or driver: it downloads, and must not")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_download)
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "needs Debian's chromium and chromium-driver (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="a1_jax_chromium_")
    # Headless, and quiet on the network: no updates, sync, QUIC or background requests from a fresh profile.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _page(driver, url: str, portrait: str, driving: str) -> None:
    """Opens the page, uploads the two files, and sets the short, cheap generation every test here uses."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    _wait(driver, "return document.querySelector('#portrait input[type=file]') !== null", 60)
    driver.find_element(By.CSS_SELECTOR, "#portrait input[type=file]").send_keys(portrait)
    driver.find_element(By.CSS_SELECTOR, "#driving input[type=file]").send_keys(driving)
    driver.find_element(By.CSS_SELECTOR, "#settings button").click()
    for field, value in (("steps", STEPS), ("max_frames", FRAMES)):
        box = driver.find_element(By.CSS_SELECTOR, f"#{field} input[type=number]")
        box.send_keys(Keys.CONTROL, "a")  # one call holds CONTROL until its end: the value is typed apart
        box.send_keys(Keys.BACKSPACE, str(value), Keys.TAB)
    _wait(driver, "return document.querySelector('#driving video') !== null", 60)  # both uploads shown
    driver.execute_script(PROGRESS_RECORDER)
    driver.find_element(By.ID, "generate").click()


# Every progress text the page shows, recorded by the page itself as it changes (polling would miss a short stage).
PROGRESS_RECORDER = """
window.progressShown = new Set();
new MutationObserver(() => {
  document.querySelectorAll('.progress-text, .progress-level').forEach(e => window.progressShown.add(e.textContent));
  document.querySelectorAll('[role=progressbar]')  // "denoise: 1 / 2 steps"
    .forEach(e => window.progressShown.add(e.getAttribute('aria-valuetext') || ''));
}).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def _wait(driver, script: str, seconds: float):
    """Polls `script` in the page until it returns something truthy."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        found = driver.execute_script(script)
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"not in the page after {seconds} s: {script}")


ERROR_TEXT = "return Array.from(document.querySelectorAll('.toast-body')).map(e => e.textContent).join(' ')"
VIDEO_SOURCE = "return (document.querySelector('#animated video') || {}).src"


def test_browser_shows_an_error_then_animates_the_example(server, browser, bad_inputs, examples, tmp_path):
    from selenium.webdriver.common.by import By

    before = server.sessions()
    browser.get(server.url)
    _wait(browser, "return document.querySelector('tr.tr-body') !== null", 60)
    browser.find_element(By.CSS_SELECTOR, "tr.tr-body").click()  # the example row fills both inputs
    filled = _wait(browser, "const image = document.querySelector('#portrait img'), "
                            "video = document.querySelector('#driving video'); "
                            "return image && video && image.src && video.src && [image.src, video.src]", 60)
    assert filled[0].endswith("portrait.png") and filled[1].endswith("driving.mp4"), filled

    _page(browser, server.url, str(bad_inputs / "grey.png"), examples["driving"])
    message = _wait(browser, ERROR_TEXT, 120)
    assert "no face found in grey.png: use a portrait with one clearly visible face" in message, message
    assert server.next_request()["user_error"]

    _page(browser, server.url, examples["portrait"], examples["driving"])  # a fresh page: a new session
    source = _wait(browser, VIDEO_SOURCE, RUN_SECONDS)
    assert source.startswith(server.url) and source.endswith("animated.mp4"), source
    seen = browser.execute_script("return Array.from(window.progressShown)")
    for shown in ["landmarks", "conditions", "decode"] + [rf"denoise\W+{step}\s*/\s*{STEPS} steps"
                                                        for step in range(1, STEPS + 1)]:  # each stage, each step
        assert any(re.search(shown, text) for text in seen), (shown, seen)
    logged = server.next_request()
    assert logged["ok"] and (logged["frames"], logged["steps"]) == (FRAMES, STEPS), logged  # the settings typed in
    _wait(browser, "return Array.from(document.querySelectorAll('#animated video, #preview video, #control video'))"
                   ".filter(v => v.readyState >= 2 && v.videoWidth > 0).length === 3", 120)  # all three play
    page_height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, page_height + 200)  # the whole page in the screenshot (200: the window's frame)
    screenshot = tmp_path / "app.png"
    browser.save_screenshot(str(screenshot))
    image = cv2.imread(str(screenshot))
    assert image.shape[1] == 1280 and image.shape[0] >= page_height and image.std() > 10, image.shape
    if os.environ.get("A1_JAX_APP_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["A1_JAX_APP_SCREENSHOT"])

    assert len(server.sessions() - before) >= 1  # the page's session has its folder
    browser.get("about:blank")  # the page is closed: its session ends, and its folder goes
    started = time.monotonic()
    while server.sessions() - before:
        assert time.monotonic() - started < 60, server.sessions() - before
        time.sleep(0.5)
