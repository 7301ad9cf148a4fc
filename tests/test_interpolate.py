"""Frame interpolation (`a1_jax.interpolate`): `flow` on real motion and on an occlusion with exact flows, re-timing
with exact timestamps, `film` through a tiny TorchScript module that follows FILM's calling convention, long-video
seams on a real driving clip, and `a1-jax interpolate` (duration, audio, bad inputs)."""

import json
import sys

import cv2
import numpy as np
import pytest
import torch  # the test extra: builds TorchScript stand-ins for FILM

from a1_jax.cli import main
from a1_jax.errors import UserError
from a1_jax.interpolate import BlendInterpolator, make_interpolator, parse_fps, retime, retimed_length
from a1_jax.interpolate.flow import FlowInterpolator
from a1_jax.io.audio import stream_durations
from a1_jax.io.video import probe_video, read_frames, resample_indices, write_video
from a1_jax.sampling.windows import WindowPlan, stitch

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # FILM ships as TorchScript


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
    return float(10 * np.log10(255 ** 2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def drive_4(shared):
    """drive_4 (512×512, 23.976 fps, a talking head turning): its first 13 frames."""
    return list(read_frames(str(shared / "data" / "driving" / "drive_4.mp4"), range(13)))


# ---------------------------------------------------------------------------------------------------------- flow
def test_flow_makes_dropped_frames_of_a_real_video_better_than_a_cross_fade(drive_4):
    flow, blend = make_interpolator("flow"), make_interpolator("blend")
    gains = []
    for i in range(1, 12, 2):  # frames 1, 3, … made from their neighbours and compared with the real ones
        a, real, b = drive_4[i - 1], drive_4[i], drive_4[i + 1]
        gains.append(psnr(flow(a, b, [0.5])[0], real) - psnr(blend(a, b, [0.5])[0], real))
    assert np.mean(gains) > 2.0 and min(gains) > 0, gains  # the bench: +4.5 dB on this video


def test_flow_endpoints_are_the_inputs_and_a_static_pair_stays_put(drive_4):
    flow = make_interpolator("flow")
    a, b = drive_4[0], drive_4[2]
    frames = flow(a, b, [0.0, 0.25, 1.0])
    assert np.array_equal(frames[0], a) and np.array_equal(frames[2], b)
    assert psnr(frames[1], a) > psnr(frames[1], b)  # a quarter of the way: nearer a
    assert psnr(flow(a, a, [0.5])[0], a) > 45


def _occlusion_scene(shared):
    """A portrait background and a textured square moving 12 px right: frames at t = 0, ½, 1 and exact flows."""
    background = cv2.resize(cv2.imread(str(shared / "data" / "portraits" / "ref_1.png"))[..., ::-1], (160, 112),
                            interpolation=cv2.INTER_AREA)
    patch = cv2.resize(cv2.imread(str(shared / "data" / "portraits" / "ref_4.png"))[..., ::-1], (48, 48),
                       interpolation=cv2.INTER_AREA)
    x0, y0, size, shift = 40, 32, 48, 12

    def frame(x):
        image = background.copy()
        image[y0:y0 + size, x:x + size] = patch
        return np.ascontiguousarray(image)

    forward = np.zeros((112, 160, 2), np.float32)
    backward = np.zeros((112, 160, 2), np.float32)
    forward[y0:y0 + size, x0:x0 + size, 0] = shift  # a's square moves right
    backward[y0:y0 + size, x0 + shift:x0 + shift + size, 0] = -shift  # b's square came from the left
    return frame(x0), frame(x0 + shift // 2), frame(x0 + shift), forward, backward, (x0, y0, size, shift)


def test_flow_takes_what_one_frame_hides_from_the_other_frame_only(shared):
    a, middle, b, forward, backward, (x0, y0, size, shift) = _occlusion_scene(shared)
    made = FlowInterpolator().frames_from_flows(a, b, forward, backward, [0.5])[0]
    assert psnr(made, middle) > 35
    rows = slice(y0 + 2, y0 + size - 2)
    uncovered = (rows, slice(x0 + 1, x0 + shift // 2 - 1))  # background only b shows at t = ½ (a's square hid it)
    covered = (rows, slice(x0 + size + shift // 2 + 1, x0 + size + shift - 1))  # background only a still shows
    for region in (uncovered, covered):
        error = np.abs(made[region].astype(int) - middle[region]).mean()
        even_mix = np.abs(((a[region].astype(int) + b[region]) / 2) - middle[region]).mean()
        assert error < 2 and even_mix > 10, (error, even_mix)


def test_flow_cross_fades_frames_that_do_not_show_one_scene(shared, drive_4):
    other = cv2.resize(cv2.imread(str(shared / "data" / "portraits" / "ref_1.png"))[..., ::-1], (512, 512))
    other = np.ascontiguousarray(other)
    flow = FlowInterpolator()
    assert flow.pair_flow(drive_4[0], other).inconsistent > 0.5 > flow.pair_flow(drive_4[0], drive_4[2]).inconsistent
    assert np.array_equal(flow(drive_4[0], other, [0.3])[0], BlendInterpolator()(drive_4[0], other, [0.3])[0])


# ------------------------------------------------------------------------------------------------------ re-timing
@pytest.mark.parametrize("fps_out", [12, 24, 30, 50, 60])
def test_retime_puts_every_frame_at_its_exact_time(fps_out):
    # Source frame i has value 20·i: a cross-fade at t between i and i + 1 shows 20·(i + t), its position in time.
    frames = [np.full((4, 6, 3), 20 * i, np.uint8) for i in range(10)]
    out = list(retime(iter(frames), 12, fps_out, BlendInterpolator(), workers=1))
    assert len(out) == retimed_length(10, 12, fps_out) == int(np.ceil(10 * fps_out / 12 - 1e-9))
    expected = [min(20 * k * 12 / fps_out, 20 * 9) for k in range(len(out))]  # the last frame held to the end
    assert np.allclose([f[0, 0, 0] for f in out], expected, atol=0.5)
    threaded = list(retime(iter(frames), 12, fps_out, BlendInterpolator(), workers=3))
    assert all(np.array_equal(x, y) for x, y in zip(out, threaded)) and len(threaded) == len(out)


def test_retime_keeps_the_duration_at_rates_that_are_not_multiples():
    for fps_in, n, fps_out in [(30000 / 1001, 300, 60), (25, 101, 24), (12, 47, 29.97), (23.976, 75, 12)]:
        count = retimed_length(n, fps_in, fps_out)
        assert n / fps_in <= count / fps_out < n / fps_in + 1 / fps_out
        frames = (np.full((2, 2, 3), i % 256, np.uint8) for i in range(n))
        assert sum(1 for _ in retime(frames, fps_in, fps_out, BlendInterpolator())) == count


@pytest.mark.parametrize("text", ["abc", "", "11.9", "6", "nan", "inf", "-24", "241"])
def test_bad_fps_is_a_user_error(text):
    with pytest.raises(UserError, match="--fps"):
        parse_fps(text)


def test_fps_accepts_any_rate_from_12():
    assert [parse_fps(x) for x in ("12", "24", "29.97", "60", "240")] == [12, 24, 29.97, 60, 240]


# ---------------------------------------------------------------------------------------------------------- film
class FilmStandIn(torch.nn.Module):
    """FILM's convention as the reference calls it: model(x0, x1, dt); x0, x1 `[1, 3, H, W]` RGB in [0, 1]; dt
    `[1, 1]`; all one dtype. It checks that, and answers a cross-fade plus a bump 0.1·dt·(1 − dt) that makes the
    recursion visible (FILM's in-betweens are not linear in dt either)."""

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        assert x0.dim() == 4 and x0.size(0) == 1 and x0.size(1) == 3 and x1.shape == x0.shape
        assert dt.dim() == 2 and dt.size(0) == 1 and dt.size(1) == 1
        assert dt.dtype == x0.dtype and x1.dtype == x0.dtype
        assert bool(x0.min() >= 0.0) and bool(x0.max() <= 1.0) and bool(x1.min() >= 0.0) and bool(x1.max() <= 1.0)
        return x0 * (1 - dt) + x1 * dt + 0.1 * dt * (1 - dt)


class NotFilm(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _torchscript(module: torch.nn.Module, path) -> str:
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


@pytest.fixture(scope="module")
def film_file(tmp_path_factory):
    return _torchscript(FilmStandIn(), tmp_path_factory.mktemp("film") / "film_standin.pt")


def test_film_follows_the_reference_convention_and_recursion(film_file):
    film = make_interpolator("film", film_file)
    a = np.full((64, 96, 3), 40, np.uint8)
    b = np.full((64, 96, 3), 200, np.uint8)
    a[:, :48], b[:32] = 10, 250  # not constant: the argument order shows

    def bump(x, y, dt):  # the stand-in, in [0, 1] units
        return x * (1 - dt) + y * dt + 0.1 * dt * (1 - dt)

    x, y = a / 255.0, b / 255.0
    # 12 -> 48 fps: t = ½ from the pair, then ¼ and ¾ from the halves, all at dt = ½ (spec §1.7).
    half = bump(x, y, 0.5)
    expected = np.stack([bump(x, half, 0.5), half, bump(half, y, 0.5)])
    made = film(a, b, [0.25, 0.5, 0.75])
    assert np.abs(made.astype(int) - np.floor(np.clip(expected, 0, 1) * 255)).max() <= 1  # ×255, truncated
    # One time alone is one call at that dt (the reference's 1/3 for two in-betweens: first t = 1/3 from the pair).
    third = film(a, b, [1 / 3])[0]
    assert np.abs(third.astype(int) - np.floor(bump(x, y, 1 / 3) * 255)).max() <= 1


def test_interpolate_command_with_film(tmp_path, film_file, capsys):
    source = tmp_path / "in.mp4"
    write_video(str(source), [np.full((32, 48, 3), 20 * i, np.uint8) for i in range(6)], fps=12)
    out = tmp_path / "out.mp4"
    code = main(["interpolate", "--in", str(source), "--out", str(out), "--fps", "24", "--interpolator", "film",
                 "--interpolator-weights", film_file])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["ok"] and summary["frames"] == 12 and summary["interpolator"] == "film"
    assert summary["audio_seconds"] is None  # a video without sound stays without
    assert probe_video(str(out)).num_frames == 12


# ------------------------------------------------------------------------------------------------------- seams
def test_a_seam_changes_no_more_from_frame_to_frame_than_the_frames_around_it(shared):
    """Two windows render the same 8 driving frames of a real clip (drive_4 at 12 fps); the later one places the head
    6 px right, 3 px lower and 3 % larger, as two diffusion windows may. Across the seam, no step from one frame to the
    next is larger than the largest step among the 8 frames either side; a hard cut is."""
    path = str(shared / "data" / "driving" / "drive_4.mp4")
    info = probe_video(path)
    frames = [cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA)
              for f in read_frames(path, resample_indices(info.num_frames, info.fps))]
    plan = WindowPlan(num_driving=len(frames), window=24, overlap=8)
    assert plan.starts == [0, 16]  # one seam: driving frames 16–23 rendered by both windows

    def placed(frame, amount):  # the later window's placement, `amount` of the way
        matrix = cv2.getRotationMatrix2D((128, 128), 0, 1 + 0.03 * amount)
        matrix[:, 2] += (6 * amount, 3 * amount)
        return cv2.warpAffine(frame, matrix, (256, 256), borderMode=cv2.BORDER_REPLICATE)

    def windows():
        for k, start in enumerate(plan.starts):
            rendered = np.stack([frames[0]] + [placed(frames[i], k) for i in plan.indices(start)])
            yield rendered, rendered

    def steps(seam, seam_frames):
        video = [frame for frame, _ in stitch(plan, windows(), seam=seam, seam_frames=seam_frames)]
        return video, np.array([np.abs(video[k + 1].astype(np.float32) - video[k]).mean()
                                for k in range(len(video) - 1)])

    video, change = steps(make_interpolator("flow"), 8)
    around = max(change[7:15].max(), change[24:32].max())  # steps among the 8 frames before and after
    assert change[15:24].max() <= around, (change[15:24], around)
    _, cut = steps(BlendInterpolator(), 0)
    assert cut[23] > around  # without smoothing the seam is the largest step
    # Interpolation moves the head across; a cross-fade shows it twice.
    ideal = [placed(frames[16 + j], (j + 1) / 9) for j in range(8)]
    faded, _ = steps(BlendInterpolator(), 8)
    assert min(psnr(video[16 + j], ideal[j]) for j in range(8)) > 40
    assert max(psnr(faded[16 + j], ideal[j]) for j in range(8)) < 35


# ------------------------------------------------------------------------------------------------- the command
def test_interpolate_command_retimes_a_real_video_and_keeps_its_audio(tmp_path, shared, capsys):
    source = shared / "data" / "driving" / "drive_4.mp4"
    out = tmp_path / "drive_4_30.mp4"
    assert main(["interpolate", "--in", str(source), "--out", str(out), "--fps", "30"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    info = probe_video(str(out))
    assert summary["ok"] and summary["interpolator"] == "flow"
    assert info.fps == 30 and info.num_frames == summary["frames"] == retimed_length(75, 23.976, 30) == 94
    before, after = stream_durations(str(source)), stream_durations(str(out))
    assert summary["audio_seconds"] == pytest.approx(before["audio"], abs=0.03)  # the input's sound, kept
    assert after["audio"] == pytest.approx(before["audio"], abs=0.03)
    assert after["video"] == pytest.approx(before["video"], abs=1 / 30 + 0.01)  # the same duration: in sync
    first = next(read_frames(str(source), [0]))
    assert psnr(next(read_frames(str(out), [0])), first) > 35  # t = 0 is the source's own frame


@pytest.mark.parametrize("case, words", [
    ("unreadable video", "cannot read video"),
    ("missing video", "video not found"),
    ("fps below 12", "--fps must be between 12"),
    ("fps not a number", "--fps must be a number"),
    ("unknown interpolator", "unknown interpolator"),
    ("film without weights", "needs --interpolator-weights"),
    ("missing film file", "FILM weights not found"),
    ("film file not TorchScript", "is not a TorchScript file"),
    ("film file another network", "is not a FILM model"),
    ("torch missing", "needs PyTorch"),
    ("weights for flow", "--interpolator-weights is for --interpolator film"),
])
def test_interpolate_bad_inputs_are_one_line_exit_2(tmp_path, shared, capsys, monkeypatch, case, words):
    good = str(shared / "data" / "driving" / "drive_4.mp4")
    args = {"--in": good, "--fps": "24"}
    extra = []
    if case == "unreadable video":
        (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 100)
        args["--in"] = str(tmp_path / "broken.mp4")
    elif case == "missing video":
        args["--in"] = str(tmp_path / "absent.mp4")
    elif case == "fps below 12":
        args["--fps"] = "10"
    elif case == "fps not a number":
        args["--fps"] = "fast"
    elif case == "unknown interpolator":
        extra = ["--interpolator", "magic"]
    elif case == "film without weights":
        extra = ["--interpolator", "film"]
    elif case == "missing film file":
        extra = ["--interpolator", "film", "--interpolator-weights", str(tmp_path / "film_net_fp16.pt")]
    elif case == "film file not TorchScript":
        (tmp_path / "film.pt").write_bytes(np.random.default_rng(0).bytes(4096))
        extra = ["--interpolator", "film", "--interpolator-weights", str(tmp_path / "film.pt")]
    elif case == "film file another network":
        extra = ["--interpolator", "film", "--interpolator-weights", _torchscript(NotFilm(), tmp_path / "other.pt")]
    elif case == "torch missing":
        (tmp_path / "film.pt").write_bytes(b"x")
        monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
        extra = ["--interpolator", "film", "--interpolator-weights", str(tmp_path / "film.pt")]
    elif case == "weights for flow":
        extra = ["--interpolator-weights", str(tmp_path / "film.pt")]
    out = tmp_path / "out.mp4"
    argv = ["interpolate", "--out", str(out), *[x for kv in args.items() for x in kv], *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
