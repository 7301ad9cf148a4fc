"""The web app: a page and an API (`/animate`) over `sampling.animate.run_animate`, the function `a1-jax animate` runs.

* One Animator per process, built at start; one generation at a time (Gradio's queue shows the others their place;
  a lock makes it so whatever the queue does). Progress per stage and step comes from the run's `Stages`; the
  cancel button (or a client's `job.cancel()`) stops the run at its next frame, step or decoder chunk.
* Every file of a request lives in its session's private folder under the server's root (mode 0700, also Gradio's
  upload cache): the uploads are copied in, the outputs written there, and the folder (with the uploads its
  requests used) is deleted when the session ends (the page is closed, or an hour without a request: API clients
  never say goodbye); the root goes at exit. Inputs are uploads only, handed to the library untouched: Gradio
  refuses a client-sent path outside its upload cache, and no input names a path.
* A user's mistake comes back as the sentence the CLI prints (`UserError`), with the server's folders taken out.
"""

import asyncio
import collections
import contextlib
import dataclasses
import html
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Iterable, Iterator

from a1_jax import examples
from a1_jax.errors import UserError
from a1_jax.progress import Stages
from a1_jax.sampling.preflight import AnimateRequest

SESSION_IDLE_SECONDS = 3600.0
API_NAME = "animate"
VIDEO_HEIGHT = 280  # pixels: the page's inputs and outputs fit one screen
DEFAULT = AnimateRequest(out="")  # the CLI's defaults
OUTPUT_NAMES = {"out": "animated.mp4", "preview": "preview.mp4", "control": "control.mp4"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (flags of `a1-jax app`)."""

    max_seconds: float = 60.0  # the longest motion source (driving video, speech, spoken text)
    max_upload_mb: float = 100.0  # per uploaded file


class Sessions:
    """One private folder per session under `root`, a fresh sub-folder per request. A session's folder is deleted
    by `close` (the page was closed) or after `idle_seconds` without a request; never while one of its requests
    runs (then when it ends). The uploads its requests used (Gradio keeps one copy per content, shared by the
    sessions that sent it) go with the last session that used them."""

    def __init__(self, root: str, idle_seconds: float = SESSION_IDLE_SECONDS):
        self.root, self.idle_seconds = root, idle_seconds
        self._folders: dict[str, str] = {}
        self._last_used: dict[str, float] = {}
        self._running: dict[str, int] = {}
        self._closing: set[str] = set()
        self._uploads: dict[str, set[str]] = {}
        self.keep: set[str] = set()  # files every session reads (the examples' copies): never deleted here
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def request(self, session: str, uploads: Iterable[str] = ()) -> Iterator[str]:
        """A new folder for one request of `session`, inside the session's own; `uploads`: the files of Gradio's
        upload cache the request reads."""
        with self._lock:
            self._uploads.setdefault(session, set()).update(os.path.realpath(path) for path in uploads)
            self._sweep()
            folder = self._folders.get(session)
            if folder is None:
                folder = self._folders[session] = tempfile.mkdtemp(prefix="session-", dir=self.root)
            self._running[session] = self._running.get(session, 0) + 1
            self._closing.discard(session)
        try:
            yield tempfile.mkdtemp(prefix="request-", dir=folder)
        finally:
            with self._lock:
                self._running[session] -= 1
                self._last_used[session] = time.monotonic()
                if session in self._closing:
                    self._remove(session)

    def close(self, session: str) -> None:
        """The session ended: its folder goes now, or when its running request ends."""
        with self._lock:
            if self._running.get(session):
                self._closing.add(session)
            else:
                self._remove(session)

    @property
    def open(self) -> int:
        return len(self._folders)

    def _sweep(self) -> None:
        now = time.monotonic()
        for session, used in list(self._last_used.items()):
            if not self._running.get(session) and now - used > self.idle_seconds:
                self._remove(session)

    def _remove(self, session: str) -> None:
        folder = self._folders.pop(session, None)
        self._last_used.pop(session, None)
        self._running.pop(session, None)
        self._closing.discard(session)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        mine = self._uploads.pop(session, set())
        for path in mine.difference(self.keep, *self._uploads.values()):
            with contextlib.suppress(OSError):
                os.remove(path)
                os.rmdir(os.path.dirname(path))  # Gradio's folder for that upload (named by its content hash)


def _private_name(path: str | None, folder: str) -> str | None:
    """A path inside a request's folder as the user knows it (the file's name); the server's folders stay private."""
    if path is None:
        return None
    return os.path.relpath(path, folder) if os.path.abspath(path).startswith(folder + os.sep) else path


def _copy_upload(payload: dict | None, folder: str) -> str | None:
    """An upload (Gradio's file payload, its path already checked to lie in the upload cache) copied into the
    request's folder under its own file name (names in messages are the user's)."""
    if payload is None:
        return None
    path = payload["path"]
    target = os.path.join(folder, os.path.basename(path))
    try:
        shutil.copyfile(path, target)
    except FileNotFoundError:  # its session ended (or was idle too long) and took it along
        raise UserError(f"{os.path.basename(path)} is no longer on the server: upload it again") from None
    return target


def _number(value: Any, default: Any, kind: type, flag: str) -> Any:
    """A setting as the API or page sent it (None: the CLI's default); a value that is no number is the user's."""
    if value is None:
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be a number, got {value!r}") from None


class Server:
    """The state of one `a1-jax app` process: its Animator, its sessions, its limits, the generation lock."""

    def __init__(self, animator: Any, sessions: Sessions, limits: Limits):
        self.animator, self.sessions, self.limits = animator, sessions, limits
        self._one_at_a_time = threading.Lock()
        self.served = {"ok": 0, "failed": 0, "user_errors": 0, "cancelled": 0}

    def generate(self, session: str, stages: Stages, portrait: dict | None, driving: dict | None,
                 audio: dict | None, text: str | None, steps: Any, guidance: Any, seed: Any, fps: Any,
                 single_clip: Any, max_frames: Any) -> tuple[str, str, dict, str] | None:
        """One request, in a worker thread: (video, preview, summary, control), or None when cancelled (a summary
        with `ok` false but no `error`, e.g. fewer frames than planned, is returned as the CLI prints it). The inputs
        are as the page or API sent them (uploads as Gradio's file payloads; None: the CLI's default). A user's
        mistake raises `UserError` with the server's paths taken out."""
        from a1_jax.sampling.animate import run_animate

        uploads = [payload["path"] for payload in (portrait, driving, audio) if payload is not None]
        with self._one_at_a_time, self.sessions.request(session, uploads) as folder:
            summary: dict[str, Any] = {}
            try:
                if portrait is None:
                    raise UserError("animate needs a portrait")
                request = AnimateRequest(
                    ref=_copy_upload(portrait, folder), driving=_copy_upload(driving, folder),
                    audio=_copy_upload(audio, folder), text=text or None,
                    steps=_number(steps, DEFAULT.steps, int, "--steps"),
                    guidance=_number(guidance, DEFAULT.guidance, float, "--guidance"),
                    seed=_number(seed, DEFAULT.seed, int, "--seed"), fps=DEFAULT.fps if fps is None else fps,
                    single_clip=bool(single_clip), max_frames=_number(max_frames, None, int, "--max-frames"),
                    max_seconds=self.limits.max_seconds,
                    **{key: os.path.join(folder, name) for key, name in OUTPUT_NAMES.items()})
                summary = run_animate(request, stages=stages, animator=self.animator)
            except UserError as e:
                message = str(e).replace(folder + os.sep, "")
                summary = {"error": message, "user_error": True, "ok": False}
                raise UserError(message) from None
            finally:
                kind = ("cancelled" if summary.get("cancelled") else "ok" if summary.get("ok") else
                        "user_errors" if summary.get("user_error") else "failed")
                self.served[kind] += 1
                print(json.dumps({"request": {key: _private_name(value, folder) if isinstance(value, str) else value
                                              for key, value in summary.items()}}), flush=True)
        if summary.get("cancelled"):
            return None
        if summary.get("error"):  # e.g. NaN latents (broken weights): no output, the CLI's message
            raise UserError(summary["error"])
        shown = {key: _private_name(value, folder) if isinstance(value, str) else value
                 for key, value in summary.items()}
        return summary["out"], summary["preview"], shown, summary["control"]


PROGRESS_TICK = 0.05  # s between two progress updates: Gradio sends a job's latest every 10 ms (one shown for less
# may never be sent) and the page may render two that arrive together as one


def _without_count(status: str, count: tuple[int, int, str] | None) -> str:
    """A status line without its count: "denoise 3/10 steps" -> "denoise"."""
    return status if count is None else status.rsplit(f" {count[0]}/{count[1]}", 1)[0]


def _show_progress(progress: Any, status: str, count: tuple[int, int, str] | None) -> None:
    """A run's stage and its count ("denoise · window 1/2", 3 of 10 steps) on the page's progress bar."""
    desc = _without_count(status, count).strip()
    if count is None:
        progress(0.0, desc=desc)
    else:
        done, total, unit = count
        progress((done, total), desc=desc, unit=unit)


def _worth_showing(changes: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Of the status changes that came since the page was last updated, the last of each stage's run: a count
    overtaken by the next one of its stage need not show, but a stage's final count ("2/2 steps", then "decode") must,
    or the page never shows that the stage finished."""
    return [change for change, after in zip(changes, changes[1:] + [None])
            if after is None or _without_count(*after) != _without_count(*change)]


def build_app(server: Server, *, weights_note: str) -> "gradio.Blocks":  # noqa: F821
    """The page and its API. `weights_note`: what the weights are (shown at the top of the page). Gradio is imported
    here, once `serve` has pointed its folders into the server's root."""
    import gradio as gr

    # The API's defaults are the widgets' values (the CLI's), or None where a `None` default says so.
    async def animate(portrait, driving=None, audio=None, text=None, steps=None, guidance=None, seed=None, fps=None,
                      single_clip=None, max_frames=None, request: gr.Request = None, progress=gr.Progress()):
        # The run's stages change in its thread; Gradio's progress belongs to this event's context, here in the event
        # loop: each change is queued and wakes the loop, which shows what is worth showing.
        loop, changes, changed = asyncio.get_running_loop(), collections.deque(), asyncio.Event()

        def listener(stages: Stages) -> None:
            changes.append((stages.status, stages.count))  # a deque's append and popleft are thread-safe
            loop.call_soon_threadsafe(changed.set)

        stages = Stages("animate", enabled=False, listener=listener)
        work = loop.run_in_executor(
            None, server.generate, request.session_hash, stages, portrait, driving, audio, text, steps, guidance,
            seed, fps, single_clip, max_frames)
        change, shown_at = None, loop.time()
        try:
            while not work.done():
                change = asyncio.ensure_future(changed.wait())
                await asyncio.wait({work, change}, return_when=asyncio.FIRST_COMPLETED)
                change.cancel()
                changed.clear()
                taken = [changes.popleft() for _ in range(len(changes))]
                for status, count in _worth_showing(taken):
                    await asyncio.sleep(shown_at + PROGRESS_TICK - loop.time())  # the previous one reaches the page
                    _show_progress(progress, status, count)
                    shown_at = loop.time()
        except asyncio.CancelledError:  # the cancel button, a client's job.cancel(), or a closed page
            if change is not None:
                change.cancel()
            stages.cancel()
            await asyncio.wait({work})  # the run stops at its next step; the next request waits for that
            with contextlib.suppress(Exception):
                work.result()
            raise
        try:
            result = work.result()
        except UserError as e:
            raise gr.Error(html.escape(str(e), quote=False), duration=None, print_exception=False) from None
        if result is None:  # cancelled from the server's side
            raise gr.Error("cancelled: nothing was written", duration=None, print_exception=False)
        return result

    def end_session(request: gr.Request) -> None:
        server.sessions.close(request.session_hash)

    with gr.Blocks(title="a1-jax", analytics_enabled=False) as app:
        gr.Markdown("# a1-jax: animate a portrait\nA portrait and one motion source (a driving video, speech, or "
                    "text to speak) in; the portrait performing that motion out, with the source's sound. "
                    f"\n\n**Weights:** {weights_note}")
        with gr.Row():
            with gr.Column():
                portrait = gr.Image(label="portrait", type="filepath", sources=["upload", "clipboard"],
                                    elem_id="portrait", height=VIDEO_HEIGHT)
                with gr.Tabs():
                    with gr.Tab("driving video"):
                        driving = gr.Video(label="driving video", sources=["upload"], include_audio=True,
                                           elem_id="driving", height=VIDEO_HEIGHT)
                    with gr.Tab("speech"):
                        audio = gr.Audio(label="speech audio", type="filepath", sources=["upload"], elem_id="audio")
                    with gr.Tab("text"):
                        text = gr.Textbox(label="text to speak", lines=3, elem_id="text")
                gr.Markdown(f"One motion source per request, at most {server.limits.max_seconds:g} s; uploads up "
                            f"to {server.limits.max_upload_mb:g} MB.")
                with gr.Accordion("settings", open=False, elem_id="settings"):
                    steps = gr.Slider(1, 50, value=DEFAULT.steps, step=1, label="denoising steps", elem_id="steps")
                    guidance = gr.Slider(1, 10, value=DEFAULT.guidance, step=0.5,
                                         label="guidance (on the face; 1 = none)")
                    seed = gr.Number(value=DEFAULT.seed, precision=0, label="seed")
                    fps = gr.Number(value=float(DEFAULT.fps),
                                    label="output fps (12 to 240; in-between frames interpolated)")
                    single_clip = gr.Checkbox(value=False, label="single clip (the reference's 47-frame script)")
                    max_frames = gr.Number(value=None, precision=0, label="max frames (12 per second; empty: all)",
                                           elem_id="max_frames")
                with gr.Row():
                    generate = gr.Button("generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("cancel", variant="stop", elem_id="cancel")
            with gr.Column():
                video = gr.Video(label="animated video", elem_id="animated", interactive=False, height=VIDEO_HEIGHT)
                preview = gr.Video(label="side by side: reference | driving | control | output",
                                   elem_id="preview", interactive=False, height=VIDEO_HEIGHT)
                control = gr.Video(label="control video", elem_id="control", interactive=False, height=VIDEO_HEIGHT)
                summary = gr.JSON(label="summary", elem_id="summary")
        gr.Examples(examples=[[examples.portrait_path(), examples.driving_path()]], inputs=[portrait, driving],
                    label="example (public domain: NASA's astronaut portrait and a talking clip made from it)")
        event = generate.click(animate, inputs=[portrait, driving, audio, text, steps, guidance, seed, fps,
                                                single_clip, max_frames],
                               outputs=[video, preview, summary, control], api_name=API_NAME,
                               concurrency_limit=1,
                               # The uploads reach the library untouched (Gradio's own decoding would answer a file
                               # that is no image or video with its message, not the CLI's).
                               preprocess=False)
        cancel.click(None, cancels=[event], api_name=False)
        app.unload(end_session)
    server.sessions.keep.update(os.path.realpath(path) for block in app.blocks.values()
                                for path in getattr(block, "keep_in_cache", ()))  # the examples' cached copies
    return app


def serve(*, checkpoint: str | None, config: str, mesh: str | None, dtype: str | None, host: str, port: int,
          limits: Limits, offload: str = "auto") -> dict:
    """Builds the Animator, then serves the page until interrupted; the summary of what was served."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # a taken port fails at once
        try:
            probe.bind((host, port))
        except (OSError, OverflowError) as e:  # taken, not this machine's address, or no port number
            raise UserError(f"cannot serve on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    root = tempfile.mkdtemp(prefix="a1_jax_app_")  # mode 0700: this user's only
    # Read when Gradio is imported: its upload cache and scratch folders inside the root, so all go together; no
    # telemetry and no update check.
    os.environ["GRADIO_TEMP_DIR"] = root
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    stages = Stages("app")
    try:
        with stages("startup"):
            try:
                import gradio as gr
            except ImportError as e:
                raise UserError(f"the web app needs the app extra: pip install 'a1_jax[app]' ({e})") from None
            from a1_jax.sampling.animate import build_animator, random_weights_notice
        with stages("model"):
            animator = build_animator(checkpoint, config, dtype=dtype, mesh=mesh, offload=offload)
        stages.close()
        note = (random_weights_notice(animator.random_networks) if animator.random_networks else
                "; ".join(f"{name}: {source}" for name, source in animator.weights.items()))
        server = Server(animator, Sessions(root), limits)
        app = build_app(server, weights_note=note)
        app.queue(default_concurrency_limit=1)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as Ctrl-C does: folders removed
        font = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page works on an offline host
        try:
            app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True,
                       max_file_size=f"{limits.max_upload_mb:g}mb", ssr_mode=False, quiet=True,
                       theme=gr.themes.Default(font=font, font_mono=["ui-monospace", "monospace"]))
        except OSError as e:
            raise UserError(f"cannot serve on {host}:{port}: {e}") from None
        started = time.perf_counter()
        print(f"a1-jax app: serving http://{host}:{port} ({note}); Ctrl-C stops it", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            app.close()
        return {"host": host, "port": port, "served": server.served, "seconds": round(time.perf_counter() - started, 3),
                "ok": True}
    finally:
        stages.close()
        shutil.rmtree(root, ignore_errors=True)
