"""Frame interpolation on real videos: `flow`, `blend` and ffmpeg's `minterpolate` side by side (issue 17).

For every video (default: the sample driving videos, at their own frame rate and size) every other frame is kept,
the dropped ones are made again from their neighbours (t = ½) and compared with the real ones: PSNR (RGB) and SSIM
(11×11 Gaussian window, σ 1.5, mean over RGB). `flow` and `blend` run through `a1_jax.interpolate.retime` (the path
`a1-jax interpolate` takes: the kept frames at half the rate re-timed to the full rate); `minterpolate` is the ffmpeg
that imageio-ffmpeg ships (`mi_mode=mci`) on the same kept frames, losslessly piped in and out.

Speed: every video's frames resized to 720×480 (the model's output), interpolated frames per second, wall and CPU
time, on `--cores` cores (the process and ffmpeg are pinned to them). Record the load average with the figures.

    python tools/interpolation_bench.py                      # ../shared/data/driving/*.mp4, 2 cores
    python tools/interpolation_bench.py --videos a.mp4 b.mp4 --cores 2

Prints a markdown table, then one JSON line (per-video figures, means, speeds, load averages).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import resource
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
from tqdm import tqdm

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from a1_jax.interpolate import make_interpolator, retime  # noqa: E402
from a1_jax.io.video import probe_video, read_frames  # noqa: E402

SPEED_SIZE = (720, 480)  # width, height


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = float(np.mean((x.astype(np.float32) - y.astype(np.float32)) ** 2))
    return 100.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 with an 11×11 Gaussian window (σ = 1.5), per RGB channel, averaged."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = x.astype(np.float32), y.astype(np.float32)

    def smooth(z):
        return cv2.GaussianBlur(z, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mx, my = smooth(x), smooth(y)
    vx, vy, cxy = smooth(x * x) - mx * mx, smooth(y * y) - my * my, smooth(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(index[5:-5, 5:-5].mean())  # without the border the window does not cover


def minterpolate(kept: list[np.ndarray], fps: float):
    """ffmpeg's minterpolate (mi_mode=mci) from the kept frames at fps/2 to fps: a generator of output frames."""
    import imageio_ffmpeg

    height, width = kept[0].shape[:2]
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "rawvideo",
               "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", repr(fps / 2), "-i", "-",
               "-vf", f"minterpolate=fps={fps!r}:mi_mode=mci", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def feed():
        # One extra copy of the last frame: without it minterpolate stops before the last in-between.
        for frame in kept + kept[-1:]:
            process.stdin.write(np.ascontiguousarray(frame).tobytes())
        process.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    size = height * width * 3
    while True:
        data = process.stdout.read(size)
        if len(data) < size:
            break
        yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
    feeder.join()
    if process.wait() != 0:
        raise RuntimeError(f"ffmpeg minterpolate failed on {width}x{height}")


def methods(fps: float):
    """name -> function(kept frames) yielding the re-timed stream (output 2j + 1 = dropped frame 2j + 1)."""
    flow, blend = make_interpolator("flow"), make_interpolator("blend")
    return {"flow": lambda kept: retime(iter(kept), fps / 2, fps, flow),
            "blend": lambda kept: retime(iter(kept), fps / 2, fps, blend),
            "minterpolate": lambda kept: minterpolate(kept, fps)}


def quality(path: str, bar: tqdm) -> dict:
    info = probe_video(path)
    frames = list(read_frames(path, range(info.num_frames)))
    kept = frames[0::2]
    dropped = len(kept) - 1  # frames 1, 3, …, 2·len(kept) − 3: each has both neighbours kept
    row = {"video": os.path.basename(path), "size": f"{info.width}x{info.height}", "fps": round(info.fps, 3),
           "dropped": dropped}
    for name, run in methods(info.fps).items():
        scores = []
        for index, frame in enumerate(run(kept)):
            if index % 2 == 1 and index < len(frames) and index // 2 < dropped:
                scores.append((psnr(frame, frames[index]), ssim(frame, frames[index])))
                bar.update()
        if len(scores) != dropped:
            raise RuntimeError(f"{name} on {path}: {len(scores)} of {dropped} dropped frames made")
        row[name] = {"psnr": round(float(np.mean([s[0] for s in scores])), 3),
                     "ssim": round(float(np.mean([s[1] for s in scores])), 5)}
    row["flow_minus_blend_db"] = round(row["flow"]["psnr"] - row["blend"]["psnr"], 3)
    row["flow_minus_minterpolate_db"] = round(row["flow"]["psnr"] - row["minterpolate"]["psnr"], 3)
    return row


def speed(paths: list[str], bar: tqdm) -> dict:
    """Interpolated frames per second at 720×480 over every video, per method: wall and CPU (this process and its
    children: ffmpeg for minterpolate)."""
    videos = []
    for path in paths:
        info = probe_video(path)
        frames = [cv2.resize(f, SPEED_SIZE, interpolation=cv2.INTER_AREA)
                  for f in read_frames(path, range(info.num_frames))]
        videos.append((info.fps, frames[0::2]))
    results = {}
    for name in ("flow", "blend", "minterpolate"):
        made = 0
        wall, cpu, children = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        for fps, kept in videos:
            for _ in methods(fps)[name](kept):
                pass
            made += len(kept) - 1
            bar.update()
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = time.process_time() - cpu + (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime)
        results[name] = {"frames": made, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "frames_per_s": round(made / wall, 1), "cpu_ms_per_frame": round(1000 * cpu / made, 1)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", nargs="+", default=sorted(glob.glob(str(REPO.parent / "shared" / "data" /
                                                                            "driving" / "*.mp4"))))
    parser.add_argument("--cores", type=int, default=2, help="pin the bench (and ffmpeg) to this many cores")
    args = parser.parse_args()
    if not args.videos:
        raise SystemExit("no videos: pass --videos")
    cores = sorted(os.sched_getaffinity(0))[:args.cores]
    os.sched_setaffinity(0, cores)
    cv2.setNumThreads(len(cores))
    load_start = os.getloadavg()
    start = time.perf_counter()
    total = 0
    for path in args.videos:
        total += 3 * (len(range(0, probe_video(path).num_frames, 2)) - 1)
    rows = []
    with tqdm(total=total, desc="quality", unit="frame", disable=None, leave=False) as bar:
        for path in args.videos:
            rows.append(quality(path, bar))
    with tqdm(total=3 * len(args.videos), desc="speed 720x480", unit="video", disable=None, leave=False) as bar:
        speeds = speed(args.videos, bar)
    load_end = os.getloadavg()

    print("| video | size | fps | dropped frames | flow PSNR / SSIM | blend PSNR / SSIM | minterpolate PSNR / SSIM "
          "| flow − blend | flow − minterpolate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['video']} | {r['size']} | {r['fps']} | {r['dropped']} | "
              + " | ".join(f"{r[m]['psnr']:.2f} dB / {r[m]['ssim']:.4f}" for m in ("flow", "blend", "minterpolate"))
              + f" | {r['flow_minus_blend_db']:+.2f} dB | {r['flow_minus_minterpolate_db']:+.2f} dB |")
    means = {m: {"psnr": round(float(np.mean([r[m]["psnr"] for r in rows])), 3),
                 "ssim": round(float(np.mean([r[m]["ssim"] for r in rows])), 5)}
             for m in ("flow", "blend", "minterpolate")}
    print(f"| mean | | | | " + " | ".join(f"{means[m]['psnr']:.2f} dB / {means[m]['ssim']:.4f}"
                                         for m in ("flow", "blend", "minterpolate"))
          + f" | {means['flow']['psnr'] - means['blend']['psnr']:+.2f} dB"
          f" | {means['flow']['psnr'] - means['minterpolate']['psnr']:+.2f} dB |")
    print()
    print(f"| method | interpolated frames/s at 720x480 (wall, {len(cores)} cores) | CPU ms per frame | frames |")
    print("|---|---|---|---|")
    for name, s in speeds.items():
        print(f"| {name} | {s['frames_per_s']} | {s['cpu_ms_per_frame']} | {s['frames']} |")
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}")
    summary = {"videos": rows, "mean": means,
               "flow_minus_blend_db": round(means["flow"]["psnr"] - means["blend"]["psnr"], 3),
               "flow_minus_minterpolate_db": round(means["flow"]["psnr"] - means["minterpolate"]["psnr"], 3),
               "speed_720x480": speeds, "cores": len(cores), "load_average_start": load_start,
               "load_average_end": load_end, "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
