"""Synthetic moving-shape videos and physics-grounded metrics for `self_forcing.py`.

Everything here is plain numpy, seeded and deterministic; nothing is learned, so a metric cannot be
fooled by the models it judges.

Data: object k lives ONLY in colour channel k (red, green, blue), so every channel of every frame holds
exactly one object and can be analysed on its own. The label (the "prompt") picks the shape family of
the whole clip. Objects move at constant velocity and bounce elastically off the walls; positions are
sub-pixel and rendered anti-aliased, so motion is smooth. The harder variant (gravity > 0) makes them
fall and bounce off the floor: the velocity changes every frame, so a model must read it off the context
and keep the energy (the bounce height) over a long rollout.

Metrics (per frame, per channel): find the object (mass, centroid), re-render the prompted shape there,
and compare. Validity = the object is there, has the right mass, and nothing is stray. Motion = centroids
follow the data's physics (constant velocity, or gravity) with bounces, at the speed of real data (a
frozen video scores 0). Semantics = the best-fitting shape family is the label.

Also here, as non-paper code: the side-by-side GIF, the trails figure, the markdown tables of the results and
of `bench` (`python toy_data.py grid ROOT`: the chunk-wise / frame-wise table of the README's grid), and the
plumbing of self_forcing.py's command line: its stages, flags and their checks, the device, loading and atomic
writes of checkpoints, their RNG state, the NaN check, the guard of a training stage (lock, Ctrl-C).
"""
import functools

import numpy as np

SHAPES = ("square", "disc", "triangle")  # label -> shape family


# ----------------------------------------------------------------------------------------------------
# 1. Rendering and the generator

def shape_sdf(shape, dx, dy, r):
    """Signed distance (pixels, <0 inside) of a shape of half-size r centred at the origin."""
    if shape == 0:  # square
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    if shape == 1:  # disc of the same area as the square
        return np.sqrt(dx * dx + dy * dy) - r * 2 / np.sqrt(np.pi)
    # upward equilateral triangle of the same area as the square, centroid at the origin: the max of the
    # distances to its three edges (each edge lies h/3 from the centroid, outward unit normals)
    h = np.sqrt(3) / 2 * (4 * r / 3 ** 0.25)  # height of a triangle of side 4r/3^(1/4)
    n1 = (np.sqrt(3) / 2) * dx - 0.5 * dy - h / 3  # right edge
    n2 = -(np.sqrt(3) / 2) * dx - 0.5 * dy - h / 3  # left edge
    n3 = dy - h / 3  # bottom edge (y grows downwards)
    return np.maximum(np.maximum(n1, n2), n3)


def render(shape, cx, cy, size, r):
    """Anti-aliased coverage in [0, 1] of shapes at centres (cx, cy): any shape (...), returns (..., size, size).

    Pixel i covers [i, i+1); coverage = clip(0.5 - signed distance, 0, 1) (a one-pixel soft edge)."""
    g = np.arange(size, dtype=np.float32) + 0.5
    dx = g[None, :] - np.asarray(cx, np.float32)[..., None, None]  # (..., 1, W)
    dy = g[:, None] - np.asarray(cy, np.float32)[..., None, None]  # (..., H, 1)
    return np.clip(0.5 - shape_sdf(shape, dx, dy, r), 0.0, 1.0).astype(np.float32)


def walls(size, r):
    """Range of centres: every shape (the triangle reaches 1.76 r from its centroid) stays in the frame."""
    return 1.76 * r + 0.5, size - 1.76 * r - 0.5


def fold(p, lo, hi):
    """Elastic bounces between lo and hi: the position of a free path p folded back into [lo, hi]."""
    L = hi - lo
    return lo + L - np.abs(np.mod(p - lo, 2 * L) - L)


def fall(y, vy, t, g, hi):
    """Height and vertical velocity t frames after (y, vy) under gravity g (y grows downwards) with
    elastic bounces on the floor hi: a periodic parabola. Its energy fixes the impact speed u, one bounce
    period lasts 2u/g, and tau (the time since the last bounce) gives y = hi - u tau + g tau^2 / 2."""
    u = np.sqrt(np.maximum(vy * vy + 2 * g * (hi - y), 0))  # impact speed (nan-free for junk input)
    tau = np.mod((vy + u) / g + t, 2 * u / g + 1e-12)
    return hi - u * tau + 0.5 * g * tau * tau, g * tau - u


def make_videos(n, frames, size=32, n_objects=3, radius=3.5, speed=1.75, seed=0, labels=None,
                gravity=0.0):
    """n clips of `frames` frames. Returns dict:
    videos (n, F, 3, H, W) float32 in [-1, 1] (background -1); labels (n,) int;
    pos (n, F, K, 2) true centres (x, y) in pixels; vel (n, F, K, 2) true velocities (px/frame).
    Each object's speed is uniform in [0.6, 1.4] x speed px/frame, its direction uniform.
    gravity > 0 (px/frame^2): the vertical motion is a ball bouncing on the floor, its top (apex) at a
    random height inside the frame (it never reaches the ceiling), at a random phase."""
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = rng.integers(0, len(SHAPES), n)
    labels = np.asarray(labels, dtype=np.int64)
    lo, hi = walls(size, radius)
    p0 = rng.uniform(lo, hi, (n, n_objects, 2))
    angle = rng.uniform(0, 2 * np.pi, (n, n_objects))
    spd = rng.uniform(0.6 * speed, 1.4 * speed, (n, n_objects))
    v0 = np.stack([np.cos(angle), np.sin(angle)], -1) * spd[..., None]  # (n, K, 2)
    t = np.arange(frames, dtype=np.float64)[None, :, None, None]
    free = p0[:, None] + t * v0[:, None]  # (n, F, K, 2) path without walls
    pos = fold(free, lo, hi)
    # velocity sign flips after each bounce: derivative of the fold
    vel = np.sign(np.mod(free - lo, 2 * (hi - lo)) - (hi - lo)) * -1 * v0[:, None]
    if gravity > 0:  # start every object at its apex (vy = 0) at a random phase of its bounce period
        apex = rng.uniform(lo, lo + 0.8 * (hi - lo), (n, n_objects))  # a bounce of >= 20% of the height
        u = np.sqrt(2 * gravity * (hi - apex))
        phase = rng.uniform(0, 2 * u / gravity)
        pos[..., 1], vel[..., 1] = fall(apex[:, None], 0.0, phase[:, None] + t[..., 0], gravity, hi)
    videos = np.full((n, frames, 3, size, size), -1.0, np.float32)
    for s in range(len(SHAPES)):
        idx = np.where(labels == s)[0]
        if len(idx) == 0:
            continue
        cov = render(s, pos[idx, ..., 0], pos[idx, ..., 1], size, radius)  # (m, F, K, H, W)
        videos[idx, :, :n_objects] = 2 * cov - 1
    return dict(videos=videos, labels=labels, pos=pos.astype(np.float32), vel=vel.astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# 2. Corruptions (for tests and for the reader who wants to see what each metric catches)

def corrupt(videos, kind, rng=None):
    """Return a corrupted copy of videos (N, F, 3, H, W)."""
    rng = rng or np.random.default_rng(0)
    v = videos.copy()
    if kind == "blur":  # 3x3 box blur, twice
        for _ in range(2):
            p = np.pad(v, [(0, 0)] * 3 + [(1, 1), (1, 1)], mode="edge")
            v = sum(p[..., i:i + v.shape[-2], j:j + v.shape[-1]] for i in range(3) for j in range(3)) / 9
    elif kind == "fade":  # objects lose half their intensity
        v = -1 + 0.5 * (v + 1)
    elif kind == "noise":
        v = np.clip(v + rng.normal(0, 0.3, v.shape), -1, 1)
    elif kind == "frozen":  # the first frame forever
        v[:] = v[:, :1]
    elif kind == "vanish":  # object 0 disappears after the first frame
        v[:, 1:, 0] = -1
    elif kind == "duplicate":  # a second copy of object 0, shifted by 9 px (wrapping)
        v[:, :, 0] = np.maximum(v[:, :, 0], np.roll(v[:, :, 0], 9, axis=-1))
    elif kind == "slow":  # half the frame rate: every frame shown twice
        v = np.repeat(v[:, ::2], 2, axis=1)[:, :v.shape[1]]
    else:
        raise ValueError(kind)
    return v.astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# 3. Per-frame analysis

def analyse(videos, labels, n_objects=3, radius=3.5):
    """Per frame and object: presence, centroid, fidelity error, validity, best-fitting shape.
    videos (N, F, 3, H, W) in [-1, 1]. Returns dict of arrays of shape (N, F, K) (centroid (N, F, K, 2))."""
    N, F, C, H, W = videos.shape
    K = n_objects
    ink = np.clip((videos[:, :, :K] + 1) / 2, 0, 1)  # (N, F, K, H, W) coverage per channel
    area = render(0, H / 2, W / 2, H, radius).sum()  # true object area in pixels (all shapes equal)
    mass = ink.sum((-1, -2))  # (N, F, K)
    g = np.arange(H, dtype=np.float32) + 0.5
    safe = np.maximum(mass, 1e-6)
    cx = (ink.sum(-2) * g).sum(-1) / safe
    cy = (ink.sum(-1) * g).sum(-1) / safe
    present = mass > 0.5 * area
    # re-render every shape family at the estimated centre and measure the error per channel
    errs = np.stack([np.abs(ink - render(s, cx, cy, H, radius)).sum((-1, -2)) / area
                     for s in range(len(SHAPES))], -1)  # (N, F, K, S) error in units of the object area
    lab = np.broadcast_to(np.asarray(labels)[:, None, None], (N, F, K))
    err = np.take_along_axis(errs, lab[..., None], -1)[..., 0]  # error of the prompted shape
    far = np.hypot(g[None, :] - cx[..., None, None], g[:, None] - cy[..., None, None]) > 1.76 * radius + 1
    stray = (ink * far).sum((-1, -2)) / area  # ink far from the object's centre (duplicates, noise)
    valid = present & (np.abs(mass / area - 1) < 0.25) & (stray < 0.15) & (err < 0.5)
    return dict(present=present, centroid=np.stack([cx, cy], -1), err=err, valid=valid,
                shape=errs.argmin(-1), mass=mass / area)


def predict(p, d, n, lo, hi, g):
    """Where the data's physics puts an object n frames after position p (..., 2), given its last
    frame-to-frame displacement d (the mean velocity over the frame before p): walls fold x (and y without
    gravity); with gravity, y follows the bouncing parabola from the velocity AT p, d_y + g/2."""
    out = fold(p + n * d, lo, hi)
    if g > 0:
        out[..., 1] = fall(p[..., 1], d[..., 1] + g / 2, n, g, hi)[0]
    return out


def motion(centroid, ok, size, radius, gravity=0.0):
    """Physics consistency and speed from centroids (N, F, K, 2) and validity (N, F, K).
    Returns per-transition arrays over frames 1..F-1 padded to F (first frame nan):
    speed (N, F, K) = |c_t - c_{t-1}|, and phys_ok (N, F, K): c_t is within 0.5 px of where the physics
    (constant velocity or gravity, elastic bounces) puts it, from the two frames before (or from the two
    frames before those, if a bounce spoiled the last difference). nan where it cannot be judged (invalid
    frames)."""
    N, F, K, _ = centroid.shape
    lo, hi = walls(size, radius)
    speed = np.full((N, F, K), np.nan)
    phys = np.full((N, F, K), np.nan)
    d = centroid[:, 1:] - centroid[:, :-1]  # (N, F-1, K, 2)
    both = ok[:, 1:] & ok[:, :-1]
    speed[:, 1:] = np.where(both, np.linalg.norm(d, axis=-1), np.nan)
    if F >= 3:
        c = centroid
        pred1 = predict(c[:, 1:-1], d[:, :-1], 1, lo, hi, gravity)  # from c_{t-1} and c_{t-2}
        e = np.linalg.norm(c[:, 2:] - pred1, axis=-1)
        if F >= 4:  # two frames on from c_{t-2} with the velocity of (c_{t-3}, c_{t-2})
            pred2 = predict(c[:, 1:-2], d[:, :-2], 2, lo, hi, gravity)
            e2 = np.linalg.norm(c[:, 3:] - pred2, axis=-1)
            e[:, 1:] = np.minimum(e[:, 1:], e2)
        three = ok[:, 2:] & ok[:, 1:-1] & ok[:, :-2]
        phys[:, 2:] = np.where(three, (e < 0.5).astype(float), np.nan)
    return speed, phys


# ----------------------------------------------------------------------------------------------------
# 4. Scores: per segment, headline quality, drift, bootstrap confidence intervals

def _nanmean(a, axis):
    n = np.sum(~np.isnan(a), axis)
    return np.where(n > 0, np.nansum(a, axis) / np.maximum(n, 1), np.nan)


def frame_stats(videos, labels, n_objects=3, radius=3.5, gravity=0.0):
    """Per frame and object: the analysis, speed and physics consistency (see analyse and motion)."""
    a = analyse(videos, labels, n_objects, radius)
    speed, phys = motion(a["centroid"], a["valid"], videos.shape[-1], radius, gravity)
    return a, speed, phys


def per_video(stats, labels, frames):
    """Per-video statistics over the frame range `frames` (a slice) of frame_stats(). -> dict of (N,)."""
    a, speed, phys = stats
    sl = lambda x: x[:, frames].reshape(len(x), -1)  # noqa: E731
    right = np.where(sl(a["present"]), sl(a["shape"]) == np.asarray(labels)[:, None], np.nan)
    return dict(valid=sl(a["valid"]).mean(1), err=sl(a["err"]).mean(1), semantic=_nanmean(right, 1),
                phys=_nanmean(sl(phys), 1), speed=_nanmean(sl(speed), 1))


def summarise(pv, real_speed):
    """Set-level scores from per-video statistics (N,), or from (B, N) for B bootstrap sets at once. quality =
    mean(valid * phys) * min(S, 1/S), S the mean object speed over the real data's mean speed: wrong motion
    costs as much as broken frames."""
    mean = lambda a: np.nan_to_num(_nanmean(a, -1))  # noqa: E731 (0 where nothing is judgeable)
    ratio = np.nan_to_num(mean(pv["speed"]) / real_speed)
    speed_score = np.minimum(ratio, 1 / np.maximum(ratio, 1e-12))  # 0 for frozen objects
    vp = np.nan_to_num(pv["valid"] * pv["phys"])  # a video with nothing judgeable counts as 0
    out = dict(quality=vp.mean(-1) * speed_score, valid=pv["valid"].mean(-1), fidelity_err=pv["err"].mean(-1),
               phys=mean(pv["phys"]), speed_ratio=ratio, semantic=mean(pv["semantic"]))
    return {k: np.asarray(v)[()] for k, v in out.items()}  # (B,) arrays, or numbers


def score(videos, labels, real_speed, segment, n_objects=3, radius=3.5, n_boot=100, seed=0, gravity=0.0):
    """Score videos (N, F, 3, H, W) per segment of `segment` frames. Returns a dict:
    segments: list of summaries (each metric with a 95% bootstrap CI as (lo, hi) under key+'_ci'),
    all: the summary over every frame; drift: quality(last segment) - quality(first) with its CI.
    gravity: see motion."""
    N, F = videos.shape[:2]
    rng = np.random.default_rng(seed)
    boots = np.stack([rng.integers(0, N, N) for _ in range(n_boot)])  # (n_boot, N) resampled video indices

    def with_ci(pv):
        s = summarise(pv, real_speed)
        bs = summarise({k: v[boots] for k, v in pv.items()}, real_speed)  # every bootstrap set at once
        for k in list(s):
            s[k + "_ci"] = tuple(np.percentile(bs[k], [2.5, 97.5]))
        return s, bs

    out, seg_boot = dict(segments=[]), []
    stats = frame_stats(videos, labels, n_objects, radius, gravity)  # once; segments slice it
    # a segment's motion uses the frames just before it, so that every transition is judged once
    for i in range(0, F, segment):
        s, bs = with_ci(per_video(stats, labels, slice(i, min(i + segment, F))))
        out["segments"].append(s)
        seg_boot.append(bs)
    out["all"], _ = with_ci(per_video(stats, labels, slice(0, F)))
    d = seg_boot[-1]["quality"] - seg_boot[0]["quality"]
    out["drift"] = out["segments"][-1]["quality"] - out["segments"][0]["quality"]
    out["drift_ci"] = tuple(np.percentile(d, [2.5, 97.5]))
    return out


@functools.cache  # the same reference for every evaluation of a process
def real_speed(size=32, n_objects=3, radius=3.5, speed=1.75, frames=16, n=256, seed=12345, gravity=0.0):
    """Mean object speed of real videos as the metric measures it (the reference of the speed ratio)."""
    d = make_videos(n, frames, size, n_objects, radius, speed, seed, gravity=gravity)
    a = analyse(d["videos"], d["labels"], n_objects, radius)
    sp, _ = motion(a["centroid"], a["valid"], size, radius)
    return float(np.nanmean(sp))


# ----------------------------------------------------------------------------------------------------
# 5. Pictures

_FONT = {  # 3x5 bitmap font for captions (no font files, no extra dependency)
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "0": "111101101101111", "1": "010110010010111",
    "2": "110001010100111", "3": "110001010001110", "4": "101101111001001", "5": "111100110001110",
    "6": "011100110101010", "7": "111001010010010", "8": "010101010101010", "9": "010101011001110",
    "+": "000010111010000", "-": "000000111000000", ".": "000000000000010", "x": "000101010101000",
    " ": "000000000000000", "/": "001001010100100", "=": "000111000111000", ":": "000010000010000",
}


def caption(text, width, scale=1):
    """A (8*scale, width) uint8 strip with `text` written in white."""
    strip = np.zeros((8, width), np.uint8)
    x = 1
    for ch in text.upper():
        glyph = _FONT.get(ch, _FONT[" "])
        if x + 3 > width:
            break
        strip[2:7, x:x + 3] = np.array([int(b) for b in glyph], np.uint8).reshape(5, 3) * 255
        x += 4
    return np.kron(strip, np.ones((scale, scale), np.uint8))


def to_uint8(videos):
    """(N, F, 3, H, W) in [-1, 1] -> (N, F, H, W, 3) uint8."""
    return np.clip((videos.transpose(0, 1, 3, 4, 2) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def write_gif(path, panels, captions, scale=None, fps=8):
    """Side-by-side GIF: panels is a list of uint8 videos (F, H, W, 3) (same H, W; shorter ones hold
    their last frame), each with a caption above it, each pixel drawn as a scale x scale block (default:
    about 96 px per panel, so 16x16 frames are as readable as 32x32 ones)."""
    import imageio
    F = max(len(p) for p in panels)
    H, W = panels[0].shape[1:3]
    scale = scale or max(3, 96 // H)
    frames = []
    for f in range(F):
        cols = []
        for p, c in zip(panels, captions):
            img = np.kron(p[min(f, len(p) - 1)], np.ones((scale, scale, 1), np.uint8))
            cap = np.repeat(caption(c, W * scale // 2, 2)[..., None], 3, -1)  # text at 2x
            cols.append(np.concatenate([cap, img], 0))
            cols.append(np.full((cols[-1].shape[0], 2, 3), 64, np.uint8))  # separator
        frame = np.concatenate(cols[:-1], 1)
        bar = np.full((3, frame.shape[1], 3), 40, np.uint8)  # progress bar: where we are in time
        bar[:, : int(frame.shape[1] * (f + 1) / F)] = (230, 180, 0)
        frames.append(np.concatenate([frame, bar], 0))
    imageio.mimsave(path, frames, duration=1 / fps, loop=0)


class EvalSet:
    """What self_forcing.evaluate judges every method on, and how: n real videos of L frames (their labels are
    the prompts) and the real mean speed; score(videos, n) scores the first n frames per segment of the
    training length. results, videos and trails (the figure's 16x rows) start with the real data's."""

    def __init__(self, n, L, frames, size, n_objects, radius, speed, seed, gravity):
        self.real = make_videos(n, L, size, n_objects, radius, speed, seed=10_000 + seed, gravity=gravity)
        self.labels, self.args = self.real["labels"], (frames, n_objects, radius, gravity)
        self.v_real = real_speed(size, n_objects, radius, speed, gravity=gravity)
        self.results = {"real": {"label": "real data", "1x": self.score(self.real["videos"], frames),
                                 "long": self.score(self.real["videos"], L)}}
        self.videos = {"real": self.real["videos"][0]}
        self.trails = {"real": make_videos(1, 16 * frames, size, n_objects, radius, speed, seed, self.labels[:1],
                                           gravity)["videos"][0]}

    def score(self, videos, n):
        frames, n_objects, radius, gravity = self.args
        return score(videos[:, :n], self.labels, self.v_real, frames, n_objects, radius, gravity=gravity)


# ----------------------------------------------------------------------------------------------------
# 6. Markdown tables and result files (self_forcing.py's eval)

def _ci(s, k="quality"):
    return f"{s[k]:.3f} [{s[k + '_ci'][0]:.2f}, {s[k + '_ci'][1]:.2f}]"


def results_table(results, long):
    """One row per method of self_forcing.evaluate's results: cost, quality at 1x and `long`x, drift."""
    lines = [f"| method | NFE/frame | ms/frame | quality 1x | quality {long}x | speed ratio {long}x | valid {long}x "
             f"| drift {long}x |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lg = r.get("long")
        cost = "- | -" if name == "real" else f"{r['nfe_per_frame']:.1f} | {r['ms_per_frame']:.2f}"
        lines.append(f"| {r['label']} | {cost} | {_ci(r['1x']['all'])} | " + (
            f"{_ci(lg['all'])} | {lg['all']['speed_ratio']:.2f} | {lg['all']['valid']:.3f} | {lg['drift']:+.3f} "
            f"[{lg['drift_ci'][0]:+.2f}, {lg['drift_ci'][1]:+.2f}] |" if lg else "- | - | - | - |"))
    return "\n".join(lines)


def long_table(results, at):
    """Quality of the segments ending at each of `at` (x the training length), then speed, validity, drift."""
    mult = at[-1]
    lines = ["| method | " + " | ".join(f"quality {a}x" for a in at) + f" | speed ratio {mult}x | valid {mult}x "
             f"| drift {mult}x |", "|---" * (len(at) + 4) + "|"]
    for r in results.values():
        r = dict(r["long"], label=r["label"])
        last = r["segments"][-1]
        lines.append(f"| {r['label']} | " + " | ".join(_ci(r["segments"][a - 1]) for a in at)
                     + f" | {last['speed_ratio']:.2f} | {last['valid']:.3f} | {r['drift']:+.3f} "
                     f"[{r['drift_ci'][0]:+.2f}, {r['drift_ci'][1]:+.2f}] |")
    return "\n".join(lines)


def write_eval(out, head, results, videos, trails=None):
    """self_forcing.evaluate's files: the table (printed too) as .md, every number as .json, the videos
    {name: (F, C, H, W)} side by side as a GIF; with trails (the table's run), the trails figure. Without
    them (the long view), the per-segment table to the rollouts' length, results_long.*."""
    import json
    import os
    seg = len(results["real"]["long"]["segments"])
    stem, gif = ("results", "compare.gif") if trails else ("results_long", "long.gif")
    table = head + " Quality = valid x physics x speed score (1 is real data) [95% CI]; " + (
        "drift = last segment - first.\n\n" + results_table(results, seg) if trails else
        "per segment ending at Nx the training length.\n\n" + long_table(results, (1, seg // 4, seg // 2, seg)))
    for ext, text in ((".json", json.dumps(results, indent=1, default=float)), (".md", table + "\n")):
        atomic(os.path.join(out, stem + ext), text)
    print(table)
    atomic(os.path.join(out, gif), lambda p: write_gif(p, [to_uint8(v[None])[0] for v in videos.values()],
                                                       [n.split(" (")[0].replace("_", "+") for n in videos]))
    if trails:
        atomic(os.path.join(out, "trails.png"), lambda p: write_trails(p, list(trails.values()), list(trails)))
    print(f"[eval] wrote {out}/{stem}.md, {stem}.json, {gif}" + (", trails.png (each object's column in every "
                                                              "frame, time going down)" if trails else ""))


def write_samples(path, videos, labels):
    """sample's files: path.npz with videos uint8 (N, F, H, W, 3) and labels (N,), and a GIF of the first 8."""
    vids = to_uint8(videos)
    atomic(path + ".npz", lambda p: np.savez(p, videos=vids, labels=labels))
    atomic(path + ".gif", lambda p: write_gif(p, list(vids[:8]), [SHAPES[i] for i in labels[:8]]))
    print(f"[sample] wrote {path}.npz ({vids.shape}) and {path}.gif")


def write_trails(path, videos, captions, scale=6):
    """The figure: for each video (F, 3, H, W), each column's brightest pixel in every frame, time going
    down: an object moving sideways draws a slanted line that folds at the walls, a slowing one a
    steepening line, a frozen one a vertical line, a vanishing one a line that ends. Side by side, a PNG."""
    import imageio
    panels = []
    for v, c in zip(videos, captions):
        img = to_uint8(v.max(2, keepdims=True)[None])[0][:, 0]  # (F, W, 3): the max over rows
        img = np.kron(img, np.ones((scale, scale, 1), np.uint8))
        cap = np.repeat(caption(c.split(" (")[0], img.shape[1] // 2, 2)[..., None], 3, -1)  # text at 2x
        panels += [np.concatenate([cap, img], 0), np.full((img.shape[0] + cap.shape[0], 6, 3), 64, np.uint8)]
    imageio.imwrite(path, np.concatenate(panels[:-1], 1))


def weight_diff(path_a, path_b):
    """The largest difference between the averaged weights of two checkpoints."""
    import torch
    a, b = (torch.load(p, weights_only=True)["ema"] for p in (path_a, path_b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def bench_table(t, diff, modes, device, n):
    """self_forcing.py bench: seconds per step of each stage per mode, as a multiple of a DF+DMD step; on a GPU the
    fast path's speed-up over eager and the largest difference of the two runs' averaged weights."""
    rows = [f"{'stage':8s}" + "".join(f"  {m + ' s/step':>12s}  (x DF+DMD)" for m in modes)
            + "  speed-up  max |weight diff|" * (len(modes) == 2)]
    for name in dict.fromkeys(k for k, _ in t):
        row = f"{name:8s}" + "".join(f"  {t[name, m]:12.4f}  ({t[name, m] / t['df_dmd', m]:.2f} x)   " for m in modes)
        speed = f"  {t[name, 'eager'] / t[name, 'graphs']:7.1f}x  {diff[name]:.1e}" if diff else ""
        rows.append((row + speed).rstrip())
    print(f"\n[bench] {device}, {n} timed steps per stage:\n" + "\n".join(rows))
    return t


# ----------------------------------------------------------------------------------------------------
# 7. The paper's Table 2 on the toy: chunk-wise and frame-wise, every method, several seeds

GRID = (("tf", "TF"), ("df", "DF"), ("ode", "ODE init"), ("tf_dmd", "TF+DMD"), ("df_dmd", "DF+DMD"),
        ("sf", "Self Forcing"))
BASELINES = ("tf", "df", "tf_dmd", "df_dmd")  # what the paper's claims compare Self Forcing with


def grid_table(root):
    """root/seed*/{chunk,frame}/results.json (each an evaluated run, see README) -> grid.md: per seed, each
    method's quality at 1x and 4x in both settings and the frame-wise - chunk-wise change, then on how many
    seeds the paper's two claims hold. A change's interval is approximate: sqrt(h1^2 + h2^2) of the two
    runs' half-widths (the runs are independent models)."""
    import glob
    import json
    import os
    seeds, lines, held = sorted(glob.glob(os.path.join(root, "seed*"))), [], {}
    if not seeds:
        raise ValueError(f"no {root}/seed*/ folders: run the README's grid loop first")
    for d in seeds:
        try:
            r = {s: json.load(open(os.path.join(d, s, "results.json"))) for s in ("chunk", "frame")}
        except OSError as e:
            raise ValueError(f"{e.filename}: {e.strerror} (evaluate both settings first)")
        hz = lambda s, m, h: r[s][m]["1x" if h == "1x" else "long"]["all"]  # noqa: E731
        q = lambda s, m, h: (hz(s, m, h)["quality"], *hz(s, m, h)["quality_ci"])  # noqa: E731

        def change(m, h):  # frame-wise - chunk-wise, and its approximate half-width
            half = [(q(s, m, h)[2] - q(s, m, h)[1]) / 2 for s in ("frame", "chunk")]
            return q("frame", m, h)[0] - q("chunk", m, h)[0], float(np.hypot(*half))

        lines += [f"\n### {os.path.basename(d)}\n", "| method | chunk-wise 1x | chunk-wise 4x | frame-wise 1x | "
                  "frame-wise 4x | frame - chunk 1x | frame - chunk 4x | speed ratio 4x chunk / frame | "
                  "drift 4x chunk / frame |", "|---" * 9 + "|"]
        for m, label in GRID:
            if not all(m in r[s] for s in r):
                continue
            cells = [f"{v:.3f} [{lo:.2f}, {hi:.2f}]" for s in ("chunk", "frame") for v, lo, hi in
                     (q(s, m, h) for h in ("1x", "4x"))]
            cells += [f"{ch:+.3f} ± {w:.2f}" for ch, w in (change(m, h) for h in ("1x", "4x"))]
            cells += [" / ".join(f"{hz(s, m, '4x')['speed_ratio']:.2f}" for s in ("chunk", "frame")),
                      " / ".join(f"{r[s][m]['long']['drift']:+.3f}" for s in ("chunk", "frame"))]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        base = [m for m in BASELINES if all(m in r[s] for s in r)]
        for h in ("1x", "4x"):  # claim 1: SF's interval above every baseline's; claim 2: SF loses least
            for s in ("chunk", "frame"):
                held.setdefault(f"Self Forcing best, {s}-wise {h}", []).append(
                    "sf" in r[s] and all(q(s, "sf", h)[1] > q(s, m, h)[2] for m in base))
            ok = "sf" in r["chunk"] and "sf" in r["frame"]
            held.setdefault(f"frame-wise costs every baseline more than Self Forcing, {h}", []).append(
                ok and all(change("sf", h)[0] > change(m, h)[0] for m in base))
            held.setdefault(f"... with intervals apart, {h}", []).append(ok and all(
                change("sf", h)[0] - change("sf", h)[1] > change(m, h)[0] + change(m, h)[1] for m in base))
    lines += ["\n| claim (vs TF, DF, TF+DMD, DF+DMD) | seeds where it holds |", "|---|---|"] + [
        f"| {k} | {sum(v)} of {len(v)} |" for k, v in held.items()]
    table = (f"Quality [95% CI] of {len(seeds)} seeds, each with one teacher for both settings (chunk-wise: "
             "chunk=2, frame-wise: chunk=1). 'Best': its interval above every baseline's." + "\n".join(lines))
    atomic(os.path.join(root, "grid.md"), table + "\n")
    print(table + f"\n[grid] wrote {root}/grid.md")


# ----------------------------------------------------------------------------------------------------
# 8. The plumbing of self_forcing.py: errors, checkpoints, RNG, config checks, the CLI, device, atomic writes, guard

class UserError(Exception):
    """self_forcing.py's bad input: printed as one line, exit code 2 (130: interrupted), nothing destroyed."""
    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


def rng_state():
    import torch
    return {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})


def set_rng_state(state):
    import torch
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def not_finite(values, modules=()):
    """What is not finite: the first of values (a dict of numbers), else a weight of the modules, else None."""
    import math
    import torch
    bad = [f"{k} is {v}" for k, v in values.items() if not math.isfinite(v)] + ["a weight is not finite"] * (not all(
        bool(p.isfinite().all()) for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()))
    return bad[0] if bad else None


def check_fields(c, error, at_least_1=(), positive=(), non_negative=(), choices=None, rules=list):
    """Raise error(one line) at the first field of c out of its range (an integer below 1; a number not finite,
    or not > 0 (positive) or not >= 0 (non_negative); a value not among its choices), then at the first of
    rules() that is broken, each (broken?, what to say): rules() is called only once the ranges hold."""
    import math
    for f in at_least_1:
        if getattr(c, f) < 1:
            raise error(f"{f}={getattr(c, f)} must be at least 1")
    for f in positive + non_negative:
        if not (math.isfinite(getattr(c, f)) and (getattr(c, f) > 0 if f in positive else getattr(c, f) >= 0)):
            raise error(f"{f}={getattr(c, f)} must be a finite number {'>' if f in positive else '>='} 0")
    for f, ok in (choices or {}).items():
        if getattr(c, f) not in ok:
            raise error(f"{f}={getattr(c, f)!r}: choose {' or '.join(map(str, ok))}")
    for broken, message in rules():
        if broken:
            raise error(message)


def boolean(s):
    if s.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(s)  # argparse: "invalid boolean value"
    return s.lower() in ("1", "true", "yes")


@functools.cache  # reading the source takes longer than the rest of the parse
def field_notes(cls):
    """{field: the comment after it} of the dataclass cls."""
    import inspect
    import re
    return dict(re.findall(r"^ +(\w+): \w+ = .*?# (.*)$", inspect.getsource(cls), re.M))


def config_flags(p, cls, shown):
    """Add to the argparse parser p one --flag per field of the dataclass cls, default None (not given), typed
    by the field (a boolean takes only true/false/1/0/yes/no), its help the field's comment and shown[name]."""
    import dataclasses
    notes = field_notes(cls)
    for f in dataclasses.fields(cls):
        typ = {"bool": boolean, "int": int, "float": float, "str": str}[getattr(f.type, "__name__", f.type)]
        p.add_argument(f"--{f.name}", type=typ, default=None, metavar=type(f.default).__name__.upper(),
                       help=f"{notes.get(f.name, '')} [{shown[f.name]}]")


def parse_known_flags(p, argv):
    """p.parse_args(argv), but a misspelled flag is named as such, with the closest one (argparse would name
    the value after it as a bad positional: `--techer_iters 100` as an invalid stage `100`)."""
    import difflib
    known = set(p._option_string_actions)
    for a in [a.split("=")[0] for a in argv if a.startswith("--")]:
        if a not in known:
            close = difflib.get_close_matches(a, known, 1)
            p.error(f"unknown flag {a}" + (f" (did you mean {close[0]}?)" if close else ""))
    return p.parse_args(argv)


def check_config(c, heads, error):
    """self_forcing's Config: each field's range first (the rules divide by some), then each rule."""
    import dataclasses
    check_fields(c, error, at_least_1=[  # every integer but the seed and the choice of n_objects
        f.name for f in dataclasses.fields(c) if f.type is int and f.name not in ("seed", "n_objects")],
        positive=("lr", "lr_gen", "lr_critic", "speed", "radius"), non_negative=("gravity", "cfg", "real_cfg", "seed"),
        choices=dict(ode_teacher=("tf", "bidir"), critic_sigma=("dmd", "teacher"), kv_grad=("detach", "st"),
                     exit_step=("random", "last"), n_objects=(1, 2, 3)), rules=lambda: [
        (c.size % c.patch, f"size={c.size} is not a multiple of patch={c.patch}"),
        (c.width % (8 * heads), f"width={c.width} must be a multiple of {8 * heads} ({heads} heads, 3D RoPE)"),
        (c.frames % c.chunk, f"frames={c.frames} is not a multiple of chunk={c.chunk}"),
        (c.euler_steps % c.few_steps, f"euler_steps={c.euler_steps} must be a multiple of few_steps={c.few_steps}"),
        (c.restrict and c.frames < 2 * c.chunk, "restrict needs at least two chunks per clip"),
        (walls(c.size, c.radius)[0] >= walls(c.size, c.radius)[1],
         f"radius={c.radius}: the shapes do not fit a {c.size}-pixel frame")])


def make_config(args, cls, presets, heads, error):
    """self_forcing's config: cls from the preset and the flags given, checked (check_config: bad values end the
    run in one line), its device and folder resolved; the stage's own options (--context, --n, --n_frames) too."""
    import dataclasses
    import os
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    c = cls(**{**presets[args.preset], **given})
    check_config(c, heads, error)
    need = {"diffusion": ("tf", "df"), "distill": ("self", "tf", "df")}.get(args.stage)
    if need and args.context not in need or args.n < 1:
        raise error(f"{args.stage} needs --context {' | '.join(need)}" if need else f"--n={args.n}: at least 1")
    if args.n_frames is not None and (args.n_frames < 1 or args.n_frames % c.chunk):
        raise error(f"--n_frames={args.n_frames}: at least 1 and a multiple of chunk={c.chunk}")
    c.device = pick_device(c.device, error)  # auto: cuda, else mps, else cpu
    c.out = writable(c.out or os.path.join("runs", args.preset + "_gravity" * (c.gravity > 0)), error)
    return c


STAGES = {  # self_forcing.py's stages, for --help
    "demo": "(default) the whole pipeline on the preset, then eval: teacher, tf, df, ode, df+dmd, sf",
    "teacher": "train the bidirectional many-step teacher (real score, critic init)",
    "ode": "ODE-regression init of the causal few-step generator (--ode_teacher: tf model | bidir teacher)",
    "diffusion": "many-step causal baseline by flow matching: --context tf | df",
    "distill": "DMD few-step generator: --context self (Self Forcing) | tf | df (CausVid-style)",
    "sample": "write samples_MODEL.npz (videos uint8 (N,F,H,W,3), labels) and a GIF: --model NAME",
    "bench": "seconds per training step of every stage (a GPU: CUDA graphs and eager); --n timed steps (16)",
    "eval": "score every trained method at 1x and 4x (results.md, compare.gif, trails.png); --long: to 16x",
}


STAGE_OPTIONS = {"--context": ("diffusion", "distill"), "--model": ("sample",), "--n": ("sample", "bench"),
                 "--n_frames": ("sample",), "--long": ("eval",)}  # (--preset, --fresh and the fields: every stage)


def parse_cli(argv, cls, presets, methods):
    """self_forcing.py's command line: the stage, the options of some stages, and one --flag per field of cls."""
    import argparse
    import dataclasses
    import sys
    p = argparse.ArgumentParser(
        description="Self Forcing, minimal. Stages:\n" + "\n".join(f"  {k:9s} {v}" for k, v in STAGES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.error = lambda msg: (print(f"error: {msg}", file=sys.stderr), sys.exit(2))  # one line, exit 2
    p.add_argument("stage", nargs="?", default="demo", choices=list(STAGES), metavar="STAGE")
    p.add_argument("--preset", default="cpu", choices=list(presets))
    p.add_argument("--fresh", action="store_true", help="retrain this stage even if a checkpoint exists")
    p.add_argument("--context", default=None, help="tf | df for diffusion; self | tf | df for distill")
    p.add_argument("--model", default="sf", choices=methods, help="sample: the checkpoint to sample")
    p.add_argument("--n", type=int, default=16, help="sample: videos to write; bench: timed steps per stage")
    p.add_argument("--n_frames", type=int, default=None, help="sample: frames per video (default: frames)")
    p.add_argument("--long", action="store_true", help="eval: rollouts to 16x, quality per segment")
    config_flags(p, cls, {f.name: f"cpu preset: {presets['cpu'].get(f.name, f.default)}"
                          for f in dataclasses.fields(cls)})  # every field, its comment the help
    args = parse_known_flags(p, argv)
    for a in argv:  # a stage's option given to another stage would be ignored: `--context tf` alone runs the demo
        stages = STAGE_OPTIONS.get(a.split("=")[0])
        if stages and args.stage not in stages:
            p.error(f"{a.split('=')[0]} is an option of {' and '.join(stages)}, not of {args.stage}")
    return args


def load_checkpoint(path, c, what, fields, cls, error):
    """self_forcing.load: a finished checkpoint whose config agrees with c on `fields` (a field the checkpoint
    predates: cls's default), else error(one line saying what to run or which setting differs)."""
    import os
    import torch
    if not os.path.exists(path):
        raise error(f"checkpoint {path} is unfinished: run its stage again to finish it" if os.path.exists(
            path[:-3] + ".part.pt") else f"missing checkpoint {path}: run the `{what}` stage first")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  truncated or foreign file
        raise error(f"cannot read checkpoint {path}: {type(e).__name__}")
    if not (isinstance(ck, dict) and {"config", "step", "iters", "ema"} <= ck.keys()):
        raise error(f"{path} is not a checkpoint of self_forcing.py")
    for f in fields:  # a field the checkpoint predates: the default
        if (have := ck["config"].get(f, getattr(cls, f))) != getattr(c, f):
            raise error(f"checkpoint {path} has {f}={have} but this run has {f}={getattr(c, f)} (same "
                        "settings, --fresh to retrain it, or another --out for a variant)")
    return ck


def atomic(path, write):
    """write(tmp), or a string's text into tmp, then rename tmp onto path: an interrupted write never leaves
    a broken or half-new file. tmp keeps the extension: numpy and imageio pick the format by it."""
    import os
    root, ext = os.path.splitext(path)
    if isinstance(write, str):
        with open(f"{root}.tmp{ext}", "w") as f:
            f.write(write)
    else:
        write(f"{root}.tmp{ext}")
    os.replace(f"{root}.tmp{ext}", path)


def pick_device(name, error):
    """auto -> cuda, else mps, else cpu; any other name must be on this machine (cpu, cuda, cuda:i, mps)."""
    import torch
    have = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    have += ["mps"] * torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if "cuda:0" in have else have[-1]
    if name not in have + ["cuda"] * ("cuda:0" in have):
        raise error(f"--device={name}: this machine has {', '.join(have)} (or auto)")
    return name


def writable(folder, error):
    """Make the output folder and check that it can be written now, not after an hour of training. The test file is
    this process's own (stages run side by side in one folder: a shared name would be removed under another)."""
    import os
    import tempfile
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # made, then gone on close
    except OSError as e:
        raise error(f"cannot write to output folder {folder!r}: {e.strerror}")
    return folder


class Guard:
    """self_forcing.train's guard of a stage. It holds a lock on `path` (Unix flock: the system drops it however
    the process ends, so a killed process leaves no stale lock; the file holds this process's id), and while
    entered it turns Ctrl-C into a request, `stop`, that the loop answers after the step in flight (and saves
    it). Held by another process: error(one line naming `what` and that process's id). No fcntl (Windows): no lock."""

    def __init__(self, path, error=BlockingIOError, what="the stage"):
        import os
        self.file, self.stop = open(path, "a+"), False
        try:
            import fcntl
        except ImportError:
            fcntl = None  # Windows: nothing is locked
        try:
            if fcntl:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read() or "?"
            self.file.close()
            raise error(f"{what} is being trained by process {holder}: wait for it, or use another --out")
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()

    def __enter__(self):
        import signal
        self.handler = signal.signal(signal.SIGINT, lambda *_: setattr(self, "stop", True))
        return self

    def __exit__(self, *exc):
        import signal
        signal.signal(signal.SIGINT, self.handler)
        self.file.close()


if __name__ == "__main__":  # python toy_data.py grid runs/grid: the table of the README's grid loop
    import sys
    try:
        if sys.argv[1:2] != ["grid"] or len(sys.argv) != 3:
            raise ValueError("usage: python toy_data.py grid ROOT   (ROOT/seed*/{chunk,frame}/results.json)")
        grid_table(sys.argv[2])
    except ValueError as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
