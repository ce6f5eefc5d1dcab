"""Self Forcing, minimal: autoregressive video diffusion trained on its own rollouts, in one file.

Huang, Li, He, Zhou, Shechtman, "Self Forcing: Bridging the Train-Test Gap in Autoregressive Video
Diffusion", arXiv 2506.08009 (2025). Re-derived at toy scale on synthetic moving-shape videos
(toy_data.py); no code copied, nothing downloaded.

    python self_forcing.py                       # the demo: every stage on the cpu preset, then the table
    python self_forcing.py teacher --preset gpu  # one stage; `--help` lists the stages and every field's flag

The story. An autoregressive (AR) video model makes chunk i conditioned on chunks < i. Trained with
teacher forcing (TF: the context is real, clean frames) or diffusion forcing (DF: the context is real,
noisy frames), it never sees its own outputs as context during training, but only its own outputs at
inference: exposure bias. Self Forcing trains the model on exactly what it does at inference: it rolls
out the whole video chunk by chunk from noise with its KV cache (Alg. 1), and a video-level loss (DMD,
with the bidirectional teacher as the real score and a trained critic as the fake score) judges the result.

Shapes: B batch, F frames, C channels, H W pixels, p patch, N = (H/p)^2 tokens per frame,
L tokens in a sequence, D width, nh heads, hd head width, K denoising steps. t is never a length:
sigma in [0, 1] is the diffusion time (noise level); each frame has its own sigma (B, F).

Sections (paper):
  1. Config and presets
  2. Flow matching and the few-step schedule      (Sec. 3.1, App. A)
  3. The causal video DiT, one attention path     (Sec. 3.1, Fig. 2: TF / DF / SF attention)
  4. KV cache: overwrite, rolling window, sink    (Sec. 3.2, 3.4)
  5. Training loop, checkpoints, data
  6. Teacher: bidirectional flow matching         (the Wan2.1 stand-in)
  7. Causal students: ODE init, TF, DF            (Sec. 3.1, 4; CausVid)
  8. Autoregressive rollout (Algorithm 1)         (Sec. 3.2: KV cache, exit step, gradient truncation)
  9. DMD with a trained critic; SF, TF+DMD, DF+DMD (Sec. 3.3, Eq. 5-6; App. B)
 10. Evaluation: quality, drift, the long view    (Sec. 4, Table 2)
 11. CLI

Simplifications against the paper (pixels for VAE latents, a 0.26M-parameter DiT for Wan2.1-1.3B, labels for
prompts, the ODE init from the causal TF model, DMD's real score guided at 1.5, a shipped teacher): README.
"""
import copy
import dataclasses
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as Fn
from tqdm import tqdm

import toy_data

# ####################################################################################################
# 1. Config and presets

@dataclasses.dataclass
class Config:
    # data (toy_data.py)
    size: int = 16  # frame height = width in pixels
    n_objects: int = 2  # objects per clip, object k in colour channel k
    radius: float = 2.0  # half side of the square (all shapes have its area)
    speed: float = 1.0  # object speeds are uniform in [0.6, 1.4] x speed px/frame (bounces keep them)
    gravity: float = 0.0  # px/frame^2: > 0 = the harder toy, objects fall and bounce (try 0.6 on `gpu`)
    # model: a tiny DiT with per-frame adaLN-Zero and 3D RoPE (frame, row, column), 4 heads
    patch: int = 2  # N = (size/patch)^2 tokens per frame, the main cost; 16 (patch 4) did not learn shapes
    width: int = 64  # D, the token width: with depth, the size of the model
    depth: int = 3  # transformer blocks
    frames: int = 4  # F_train: frames per training clip (the teacher's window, the KV cache's at inference)
    chunk: int = 1  # frames per AR chunk: 1 = the paper's frame-wise setting, >1 chunk-wise
    # diffusion (flow matching: x_t = (1 - sigma) x0 + sigma eps, the network predicts v = eps - x0)
    few_steps: int = 4  # K, steps of the few-step generator: grid [1, .75, .5, .25] shifted
    euler_steps: int = 16  # Euler steps of the teacher and the many-step TF/DF baselines (multiple of K)
    cfg: float = 3.0  # classifier-free guidance (u + cfg (c - u)) of the teacher and TF/DF samplers
    # training (the same steps for TF and DF, and for all three DMD methods)
    batch: int = 32  # clips per step, every stage (the ODE init uses 16 x batch teacher trajectories)
    lr: float = 1e-3  # AdamW learning rate of the teacher (ODE init, TF and DF: 0.3 x)
    teacher_iters: int = 5000  # teacher training steps
    ode_teacher: str = "tf"  # whose ODE the init regresses onto: tf (the AR TF model, Causal Forcing) | bidir (paper)
    ode_iters: int = 500  # ODE-regression steps (the student starts from its ODE teacher's weights)
    diffusion_iters: int = 600  # TF and DF many-step baselines (initialised from the teacher)
    distill_iters: int = 200  # generator updates of SF, TF+DMD, DF+DMD
    critic_ratio: int = 5  # critic updates per generator update (official 5:1)
    lr_gen: float = 3e-5  # DMD generator lr (AdamW betas (0, 0.999), official); official 2e-6 at 1.3B
    lr_critic: float = 1e-4  # DMD critic lr (official 4e-7 at 1.3B)
    real_cfg: float = 1.5  # CFG of DMD's real score (u + real_cfg (c - u)); official 4 (c + 3 (c - u)): README
    critic_sigma: str = "dmd"  # the critic's noise levels: dmd (official: DMD's query levels) | teacher (logit-normal)
    kv_grad: str = "detach"  # gradient through the KV cache in SF: detach (paper) | st (official straight-through)
    exit_step: str = "random"  # SF's trained exit step: random (Alg. 1: s ~ U{0..K-1}) | last (K-1, an ablation)
    restrict: bool = False  # SF training: the last chunk cannot attend to the first (paper Sec. 3.4)
    # evaluation and infrastructure
    n_eval: int = 64  # evaluation samples (same labels and seeds for every method)
    seed: int = 0  # data, training and evaluation seeds derive from it
    device: str = "auto"  # auto = cuda, else mps, else cpu
    graphs: bool = True  # on a GPU, replay each training step from a CUDA graph (section 5); false: eager
    out: str = ""  # run folder; "" = runs/<preset> (runs/<preset>_gravity with gravity)

# Fixed by the paper's official code or by this toy, not worth a flag each:
SHIFT = 5.0  # time shift k: sigma' = k sigma / (1 + (k-1) sigma) (Wan / official)
HEADS = 4  # attention heads
P_UNCOND = 0.1  # label dropout while training, so that CFG exists
EMA, EMA_DMD = 0.999, 0.99  # EMA decay of teacher / ODE / TF / DF weights, of the DMD generators (official)
CLIP = 10.0  # gradient-norm clipping (official)
N_TRAIN = 8000  # real training clips, generated once and kept on the device
LONG = 4  # the evaluation table's long rollouts: LONG x the training length (`eval --long`: 16 x)
CKPT_EVERY = 500  # checkpoint period in steps (an interrupted stage resumes from there)
BATCHED = ("cuda", "mps")  # devices that batch the critic's rollouts into one (launch-bound; a CPU: one by one)

PRESETS = {
    "test": dict(size=8, n_objects=1, radius=1.5, speed=0.75, patch=2, width=32, depth=2, frames=4, chunk=2,
                 euler_steps=4, batch=8, teacher_iters=6, ode_iters=4, diffusion_iters=4, distill_iters=2,
                 critic_ratio=2, n_eval=4),
    "cpu": dict(),  # the defaults: 16x16, 64 tokens per frame, 4-frame clips, frame-wise
    "gpu": dict(size=32, n_objects=3, radius=3.5, speed=1.75, patch=4, width=128, depth=4, frames=8, chunk=2,
                euler_steps=32, batch=256, teacher_iters=18000, ode_iters=1000, diffusion_iters=2000,
                lr_gen=1e-5, n_eval=256),
}
# What a stage's checkpoint is made from: the model, its own and its upstream stages' settings (not its own step
# count: more steps resume it). A finished checkpoint is reused only by a run that would make the same one.
MODEL_FIELDS = ("size", "patch", "width", "depth", "gravity")  # what any checkpoint must agree on to be loaded
_teacher = MODEL_FIELDS + ("n_objects", "radius", "speed", "frames", "seed", "batch", "lr")
_diffusion = _teacher + ("teacher_iters", "chunk")
_ode = _diffusion + ("diffusion_iters", "few_steps", "euler_steps", "cfg", "ode_teacher")
_dmd = _ode + ("ode_iters", "critic_ratio", "lr_gen", "lr_critic", "real_cfg", "critic_sigma")
STAGE_FIELDS = {"teacher": _teacher, "tf": _diffusion, "df": _diffusion, "ode": _ode, "tf_dmd": _dmd, "df_dmd": _dmd,
                "sf": _dmd + ("kv_grad", "exit_step", "restrict")}

UserError = toy_data.UserError  # bad input: printed as one line, exit code 2 (130: interrupted), nothing destroyed

# ####################################################################################################
# 2. Flow matching and the few-step schedule

# Rectified flow: a straight line from data (sigma = 0) to noise (sigma = 1). The network predicts the
# velocity v = eps - x0, so one network call gives both an Euler step (x + d_sigma * v) and a clean-frame
# estimate x0_hat = x_t - sigma * v, which is what the few-step generator and DMD work with.

def shift(sigma, k=SHIFT):
    """Time shift (SD3 / Wan): spends more steps at high noise. shift(0) = 0, shift(1) = 1."""
    return k * sigma / (1 + (k - 1) * sigma)

def euler_sigmas(c):
    """(euler_steps + 1,) sigmas from 1 to 0 for the many-step samplers."""
    return shift(torch.linspace(1, 0, c.euler_steps + 1))

def few_step_sigmas(c):
    """(K,) the generator's grid: uniform [1, .75, .5, .25] shifted -> [1, .9375, .8333, .625] for k=5.
    It lies on the Euler grid (euler_steps is a multiple of K), so ODE pairs can be read off it."""
    return shift(torch.linspace(1, 0, c.few_steps + 1)[:-1])

def sample_sigma(B, n, c):
    """(B, n) training noise levels: logit-normal (SD3), dense in the middle."""
    return torch.sigmoid(torch.randn(B, n, device=c.device))

def clip_sigma(B, c, device):
    """(B, frames): one level per clip, as the teacher is trained (and the critic with critic_sigma=teacher)."""
    return sample_sigma(B, 1, c).expand(-1, c.frames)

def add_noise(x0, sigma, eps):
    """x_t = (1 - sigma) x0 + sigma eps. x0, eps (B, F, C, H, W); sigma (B, F)."""
    s = sigma[..., None, None, None]
    return (1 - s) * x0 + s * eps

# ####################################################################################################
# 3. The causal video DiT: one attention path for bidirectional, block-causal and KV-cached use

# Positions. Inside a frame, a learned spatial embedding (the frame size never changes). Across frames,
# rotary embeddings of the frame index: a query at frame i and a key at frame j interact through i - j
# only, so a model trained on 8 frames can roll out 64 with a sliding cache and never see a new offset.
# As in Wan's 3D RoPE, half of the rotated pairs turn with the token's row and column instead: attention
# then also sees where a key lies RELATIVE to the query inside the frame, which is what following an
# object from one frame to the next needs (xy=False, the frame index only, is the ablation).

def rope(pos, dim, n, xy=True, theta=10000.0):
    """cos, sin (F*N, dim/2) for the N = n*n tokens (row-major) of each frame at positions pos (F,).
    The pairs turn with the frame index; with xy, a quarter of them with the token's row and a quarter
    with its column instead."""
    ds = 2 * (dim // 8) if xy else 0  # dims per spatial axis (the frame keeps dim - 2 ds)
    freqs = lambda d: theta ** (-torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d)
    ang = [(pos.float()[:, None] * freqs(dim - 2 * ds))[:, None].expand(-1, n * n, -1)]  # (F, N, .)
    if xy:
        i = torch.arange(n * n, device=pos.device, dtype=torch.float32)
        for coord in (i // n, i % n):  # row, column of each token
            ang.append((coord[:, None] * freqs(ds))[None].expand(len(pos), -1, -1))
    ang = torch.cat(ang, -1).reshape(-1, dim // 2)
    return ang.cos(), ang.sin()

def apply_rope(x, cs):
    """Rotate pairs (x1, x2) of x (B, nh, L, hd) by the angles of cs."""
    cos, sin = cs
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).type_as(x)

# The three attention patterns of the paper's Fig. 2, as FRAME-level boolean masks (expanded to tokens in
# DiT.forward). Full attention (mask None) is the teacher and the critic. The block-causal mask trains TF,
# DF and the ODE init in parallel. The KV cache (section 4) needs no mask at all: a chunk's queries see
# exactly what the cache holds, which is what the block-causal mask would let them see (tested).

def block_causal_mask(n_frames, chunk, window=0, sink=0, device="cpu"):
    """(F, F) bool, True = may attend. Frame i sees frame j iff j's chunk is not after i's chunk
    (bidirectional inside a chunk, causal across chunks); with a window, only the last `window - sink`
    frames up to the end of i's chunk plus the first `sink` frames: what a rolling KV cache holds."""
    i = torch.arange(n_frames, device=device)[:, None]
    j = torch.arange(n_frames, device=device)[None, :]
    end = (i // chunk + 1) * chunk  # first frame after i's chunk
    m = j < end
    if window:
        m = m & ((j >= end - (window - sink)) | (j < sink))
    return m

def teacher_forcing_mask(n_frames, chunk, device="cpu"):
    """(2F, 2F) bool for the sequence [clean frames | noisy frames] (Fig. 2a): clean frames are block-
    causal among themselves; a noisy chunk sees the CLEAN earlier chunks and its own noisy chunk only."""
    bc = block_causal_mask(n_frames, chunk, device=device)
    ci = torch.arange(n_frames, device=device) // chunk
    noisy = torch.cat([ci[:, None] > ci[None, :], ci[:, None] == ci[None, :]], 1)  # clean earlier chunks | own chunk
    return torch.cat([torch.cat([bc, torch.zeros_like(bc)], 1), noisy], 0)

class Attention(nn.Module):
    def __init__(self, D, nh, layer):
        super().__init__()
        self.nh, self.layer = nh, layer
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, cs, mask=None, cache=None):
        """x (B, L, D); cs RoPE of the L tokens; mask (L, Lk) bool or None; cache: KVCache or None.
        With a cache, x is the new chunk: its keys/values are written into the cache and its queries
        attend to everything the cache holds (earlier chunks + itself), so no mask is needed."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.nh, D // self.nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, L, hd)
        q, k = apply_rope(Fn.rms_norm(qkv[:2], qkv.shape[-1:]), cs)  # QK-norm (as Wan), RoPE: keys cached rotated
        v = qkv[2]  # (B, nh, L, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, Lk, hd): cached frames + this chunk
        o = Fn.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, L, hd)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))

class Block(nn.Module):
    """DiT block with adaLN-Zero; the modulation is per FRAME (each frame has its own noise level)."""

    def __init__(self, D, nh, layer):
        super().__init__()
        self.norm1, self.norm2 = (nn.LayerNorm(D, elementwise_affine=False, eps=1e-6) for _ in range(2))
        self.attn = Attention(D, nh, layer)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(approximate="tanh"), nn.Linear(4 * D, D))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c, cs, mask, cache):
        """x (B, F, N, D); c (B, F, D) conditioning per frame."""
        B, F, N, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, :, None].chunk(6, -1)  # each (B, F, 1, D)
        h = (self.norm1(x) * (1 + sc1) + sh1).reshape(B, F * N, D)
        x = x + g1 * self.attn(h, cs, mask, cache).view(B, F, N, D)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)

class DiT(nn.Module):
    """Video DiT: patchify each frame, per-frame (sigma, label) adaLN, spatial position embedding inside
    the frame, RoPE over the frame index, row and column in attention. Predicts the flow v = eps - x0."""

    def __init__(self, c):
        super().__init__()
        D, p = c.width, c.patch
        self.p, self.N, self.hd, self.n_classes = p, (c.size // p) ** 2, D // HEADS, len(toy_data.SHAPES)
        self.embed = nn.Linear(3 * p * p, D)
        self.pos = nn.Parameter(torch.randn(self.N, D) * 0.02)  # spatial position inside a frame
        self.t_mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_emb = nn.Embedding(self.n_classes + 1, D)  # last index = "no label" (for CFG)
        self.blocks = nn.ModuleList([Block(D, HEADS, i) for i in range(c.depth)])
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.head = nn.Linear(D, 3 * p * p)
        for m in (self.ada[1], self.head):  # zero output at init
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, sigma, y, pos=None, mask=None, cache=None):
        """x (B, F, C, H, W); sigma (B, F) noise level per frame; y (B,) labels (n_classes = none);
        pos: frame index of each frame, a range (default range(F); the AR rollout passes absolute indices)
        or a tensor (F,) (teacher forcing: two halves at the same positions);
        mask (F, Fk) frame-level bool or None (= full attention, or the cache's content). -> v like x."""
        B, F, C, H, W = x.shape
        p, n = self.p, H // self.p
        pos = range(F) if pos is None else pos
        if cache is not None:
            cache.begin(pos)  # decide once which cached frames stay (overwrite / rolling window)
        if isinstance(pos, range):  # made on the device, not copied there: a copy would wait for the GPU
            pos = torch.arange(pos.start, pos.stop, device=x.device)
        # patchify: every frame becomes N = n*n tokens of C*p*p pixels
        tok = x.reshape(B, F, C, n, p, n, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, F, n * n, C * p * p)
        h = self.embed(tok) + self.pos  # (B, F, N, D)
        half = torch.arange(128, device=x.device) / 128
        te = sigma[..., None] * 1000 * 10000 ** (-half)  # sinusoidal embedding of the noise level
        # conditioning per FRAME: its own noise level (DF and the rollout mix levels) + the clip's label
        c = self.t_mlp(torch.cat([te.sin(), te.cos()], -1)) + self.y_emb(y)[:, None]  # (B, F, D)
        cs = rope(pos, self.hd, n)  # (F*N, hd/2)
        tmask = None if mask is None else mask.repeat_interleave(self.N, 0).repeat_interleave(self.N, 1)
        for blk in self.blocks:
            h = blk(h, c, cs, tmask, cache)
        # final adaLN and linear head back to pixels (zero-initialised: the untrained model predicts v = 0)
        shf, scl = self.ada(c)[:, :, None].chunk(2, -1)
        out = self.head(self.norm(h) * (1 + scl) + shf)  # (B, F, N, C p p)
        return out.view(B, F, n, n, C, p, p).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, F, C, H, W)

# Classifier-free guidance doubles the batch: the conditional and the unconditional halves share one
# forward and, in a rollout, one KV cache of batch 2B. Both halves cache the SAME context frames (the
# guided output), which is what "CFG with separate positive and negative caches" amounts to.

def guided(model, x, sigma, y, cfg, **kw):
    """Classifier-free guidance: v = v_u + cfg (v_c - v_u), one batched pass of 2B (and a 2B cache)."""
    if cfg == 1:
        return model(x, sigma, y, **kw)
    null = torch.full_like(y, model.n_classes)
    vc, vu = model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([y, null]), **kw).chunk(2)
    return vu + cfg * (vc - vu)

# ####################################################################################################
# 4. KV cache: a chunk's keys/values, overwritten in place on re-runs, rolling window with a sink

class KVCache:
    """Per layer, the rotated keys and values of the cached frames, one (B, nh, N, hd) tensor per frame.

    `begin(pos)` is called once per model call with the new frames' positions:
      - re-running a chunk (the next denoising step, the cache refresh) REPLACES that chunk's slots;
      - a new chunk is appended; if the cache would exceed `window` frames, the oldest frames are evicted,
        except the first `sink` frames, which are kept forever.
    Each frame's slot is its own tensor and keeps its own autograd history, whatever the grad mode of the
    calls that read it later: a no_grad denoising step of chunk i+1 reads the cache but cannot cut the
    graph of chunk i's slots, so the grad-enabled exit step of chunk i+1 still reaches them.
    `straight_through` (kv_grad=st, the official code's in-place cache): a re-run (the clean refresh)
    writes its own VALUES, but the gradient flows into the keys/values they replace (the exit step's):
    k = k_clean.detach() + k_exit - k_exit.detach()."""

    def __init__(self, depth, n_tokens, window, sink=0):
        self.k, self.v = [[] for _ in range(depth)], [[] for _ in range(depth)]  # per layer, per frame
        self.N, self.window, self.sink = n_tokens, window, sink
        self.frames, self.straight_through = [], False  # absolute frame index of every cached frame, in slot order

    def begin(self, pos):
        # Per FRAME and shared by all layers; update() applies it to each layer's slots.
        new, old = [int(f) for f in pos], self.frames
        keep = [f for f in old if f < new[0]]  # a re-run drops the chunk's own old slots: overwrite
        over = len(keep) + len(new) - self.window
        if over > 0:  # rolling: evict the oldest non-sink frames
            keep = [f for f in keep if f < self.sink] + [f for f in keep if f >= self.sink][over:]
        self.keep = [old.index(f) for f in keep]  # slots that stay
        self.redo = [old.index(f) if f in old else None for f in new]  # the slot each new frame replaces
        self.frames = keep + new

    def update(self, layer, k, v):
        """Store this call's k, v (B, nh, F*N, hd); return everything the new queries attend to."""
        k, v = list(k.split(self.N, 2)), list(v.split(self.N, 2))  # one (B, nh, N, hd) per frame
        k_old, v_old = self.k[layer], self.v[layer]
        if self.straight_through:  # the refresh runs under no_grad: clean values, gradient via the exit K/V
            with torch.enable_grad():
                for i, j in enumerate(self.redo):
                    if j is not None:
                        k[i] = k[i].detach() + k_old[j] - k_old[j].detach()
                        v[i] = v[i].detach() + v_old[j] - v_old[j].detach()
        self.k[layer] = [k_old[j] for j in self.keep] + k
        self.v[layer] = [v_old[j] for j in self.keep] + v
        return torch.cat(self.k[layer], 2), torch.cat(self.v[layer], 2)  # (B, nh, Lk, hd)

# ####################################################################################################
# 5. Training loop, checkpoints, data

def load(path, c, what, fields=MODEL_FIELDS):
    """A finished checkpoint made with this run's `fields` (a later stage: the model's; train(): STAGE_FIELDS)."""
    return toy_data.load_checkpoint(path, c, what, fields, Config, UserError)

def build(c, state=None):
    model = DiT(c).to(c.device)
    if state is not None:
        model.load_state_dict(state)
    return model

def ema_update(ema, model, decay, step):
    decay = min(decay, (1 + step) / (10 + step))  # warm-up: early weights must not linger in the average
    with torch.no_grad():  # one fused kernel per tensor list, not one per parameter
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)

def train(c, name, nets, step_fn, iters, ema_decay, fresh=False):
    """Generic loop: step_fn(it) -> dict of loss tensors (it steps its own optimizers), then the EMA of
    nets["model"] into nets["ema"]. A stage's checkpoint NAME.pt is written when it finishes (reused by a run
    that would make the same one); NAME.part.pt every CKPT_EVERY steps and on Ctrl-C (the same command resumes
    it; --fresh starts over, NAME.pt kept until replaced). A NaN/Inf loss or weight stops it, unsaved."""
    path, part = (os.path.join(c.out, name + e) for e in (".pt", ".part.pt"))
    # one process per stage and folder; Ctrl-C finishes the step in flight and saves it
    guard = toy_data.Guard(os.path.join(c.out, f".{name}.lock"), UserError, f"{name} in {c.out}")
    # resume: an unfinished run first, else a finished one (more steps asked); --fresh: neither
    start, kept = 0, None if fresh else part if os.path.exists(part) else path if os.path.exists(path) else None
    if kept:
        ck = load(kept, c, name, STAGE_FIELDS["sf" if name.startswith("sf") else name])
        start = ck["step"]
        if start > iters or "model" not in ck and start != iters:  # the pretrained teacher: its weights only
            raise UserError(f"checkpoint {kept} was made with {start} steps{' (weights only)' * ('model' not in ck)}, "
                            f"this run asks for {iters} steps (--fresh to retrain it, or another --out for a variant)")
        if start == iters and kept == path:  # later stages read only its "ema" weights
            return print(f"[{name}] reusing finished checkpoint {path} ({start} steps)")
        for k, m in nets.items():
            m.load_state_dict(ck[k])
        toy_data.set_rng_state(ck["rng"])  # the random draws go on where they stopped (tested)
        print(f"[{name}] resuming from step {start} of {kept}")

    def checkpoint(step):  # atomic: a temp file renamed, so an interrupted save never corrupts a checkpoint
        ck = {k: m.state_dict() for k, m in nets.items()} | dict(config=dataclasses.asdict(c), step=step, iters=iters)
        ck["rng"] = toy_data.rng_state()
        toy_data.atomic(part, lambda tmp: torch.save(ck, tmp))

    t0, bar = time.time(), tqdm(range(start, iters), desc=name, dynamic_ncols=True, mininterval=1)
    avg, shown, t_read = {}, {}, t0
    with guard:
        for it in bar:
            losses = step_fn(it)  # tensors: reading one (.item()) makes the CPU wait for the GPU to catch up
            # so they are averaged where they are (a NaN, once in, stays in), and read about once a second
            avg = {k: v.detach() if k not in avg else 0.98 * avg[k] + 0.02 * v.detach() for k, v in losses.items()}
            ema_update(nets["ema"], nets["model"], ema_decay, it)
            save_now = (it + 1) % CKPT_EVERY == 0 or it + 1 == iters or guard.stop
            if save_now or time.time() > t_read + 1:  # always before a checkpoint: a NaN never gets saved
                shown, t_read = {k: v.item() for k, v in avg.items()}, time.time()
                bad = toy_data.not_finite(shown, nets.values() if save_now else ())  # an update can overflow
                if bad:
                    raise UserError(f"[{name}] {bad} by step {it + 1}: stopped; last good checkpoint: "
                                    f"{kept or 'none yet'}")
                bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
            if save_now:
                checkpoint(it + 1)
                kept = part
            if guard.stop and it + 1 < iters:
                bar.close()
                raise UserError(f"[{name}] interrupted at step {it + 1}: saved {kept}, the same command "
                                f"{'without --fresh ' * fresh}resumes from it", code=130)  # 130: as a shell says
    os.replace(part, path)  # finished: NAME.pt, replaced only now
    print(f"[{name}] done: {iters - start} steps in {time.time() - t0:.0f}s, "
          + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return (time.time() - t0) / (iters - start)  # seconds per step (bench)

def optimize(opt, loss, model):
    """One update: backward, clip the gradient norm (official: 10), step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()

def adamw(model, lr, betas=(0.9, 0.999)):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.01,
                             fused=model.head.weight.is_cuda, capturable=model.head.weight.is_cuda)  # graphs

class Graphs:
    """The GPU's fast path: a step of this tiny model is hundreds of small kernels, slower to launch from Python
    than to run. `graphs(key, fn, *xs)` runs fn(*xs) eagerly for a new key and records its kernels in a CUDA
    graph; later calls replay them in one launch (xs copied into the recorded inputs, random draws fresh, the
    outputs overwritten). fn must launch the same kernels for a key (a rollout: one key per exit step). Off
    (CPU, --graphs false): fn(*xs), the eager reference; on, the same computation (tested, and bench checks)."""

    def __init__(self, c):
        self.on, self.recorded = c.graphs and torch.device(c.device).type == "cuda", {}

    def __call__(self, key, fn, *xs):
        if not self.on:
            return fn(*xs)
        if key in self.recorded:
            graph, inputs, out = self.recorded[key]
            [a.copy_(b) for a, b in zip(inputs, xs) if torch.is_tensor(a)]  # this call's inputs
            return graph.replay() or out
        side = torch.cuda.Stream()  # eagerly on a side stream first (PyTorch's recipe): it makes the optimizers' state
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn(*xs)  # this call's step
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the kernels, runs nothing
            self.recorded[key] = (graph, xs, fn(*xs))
        return out

def graphed(c, step):
    """A training step that launches the same kernels every time: one graph for the whole step."""
    graphs = Graphs(c)
    return lambda it: graphs("step", step, it)

class Data:
    """Real training clips, generated once (toy_data) and kept on the device; random flips and time
    reversal (both keep constant velocity, gravity and elastic bounces valid) make each batch fresh."""

    def __init__(self, c):
        d = toy_data.make_videos(N_TRAIN, c.frames, c.size, c.n_objects, c.radius, c.speed, c.seed + 1,
                                 gravity=c.gravity)
        self.x, self.y = (torch.from_numpy(d[k]).to(c.device) for k in ("videos", "labels"))

    def batch(self, B):
        i = torch.randint(len(self.x), (B,), device=self.x.device)
        x = self.x[i]
        for dim in (-1, 1):  # a horizontal flip, then time reversal, each of half the clips
            x = torch.where(torch.rand(B, 1, 1, 1, 1, device=x.device) < 0.5, x.flip(dim), x)
        return x, self.y[i]

def drop_labels(y):
    """Label dropout: the "no label" class (the last) with probability P_UNCOND, so that CFG exists."""
    return torch.where(torch.rand(y.shape, device=y.device) < P_UNCOND, len(toy_data.SHAPES), y)

def flow_matching_loss(model, x0, y, sigma, **kw):
    """E || v_theta(x_t, sigma) - (eps - x0) ||^2 over all frames. sigma (B, F)."""
    eps = torch.randn_like(x0)
    return Fn.mse_loss(model(add_noise(x0, sigma, eps), sigma, y, **kw), eps - x0)

# ####################################################################################################
# 6. Teacher: bidirectional, many-step, label-conditional (the Wan2.1 stand-in, DMD's real score)

# The teacher plays Wan2.1: a bidirectional model that sees the whole clip at once, trained by plain flow
# matching on real clips. Every causal model starts from its weights; DMD uses it as the real score and
# initialises the critic from it. Label dropout trains the unconditional model CFG needs.

def train_teacher(c, fresh=False):
    data, model = Data(c), build(c)
    ema, opt = copy.deepcopy(model).requires_grad_(False), adamw(model, c.lr)

    def step(it):
        x0, y = data.batch(c.batch)
        sigma = clip_sigma(c.batch, c, c.device)
        optimize(opt, loss := flow_matching_loss(model, x0, drop_labels(y), sigma), model)
        return {"loss": loss}

    return train(c, "teacher", {"model": model, "ema": ema, "opt": opt}, graphed(c, step), c.teacher_iters, EMA, fresh)

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "teacher.pt")

def pretrained_teacher(c):
    """The demo starts from a pretrained teacher, as the paper from Wan2.1: assets/teacher.pt, the EMA weights of
    `teacher` on the cpu preset, if this run would train that very one and has none; `demo --fresh`: from nothing."""
    path, ck = os.path.join(c.out, "teacher.pt"), torch.load(SHIPPED, weights_only=True)
    if ck["step"] != c.teacher_iters or any(ck["config"][f] != getattr(c, f) for f in STAGE_FIELDS["teacher"]) \
            or any(os.path.exists(p) for p in (path, path[:-3] + ".part.pt")):
        return False
    toy_data.atomic(path, lambda tmp: torch.save(ck, tmp))
    return print(f"[teacher] pretrained: {SHIPPED}, {ck['step']} steps (`teacher --fresh` retrains it)") or True

# The teacher samples the whole clip at once: Euler steps along the flow, x <- x + (sigma' - sigma) v,
# from sigma = 1 (noise) to 0 (data), on the shifted grid. Recording x at every (euler_steps / K)-th step
# gives the ODE pairs, because the few-step grid is the shifted uniform grid too (tested).

@torch.no_grad()
def sample_teacher(model, c, y, n_frames, trace=None):
    """Euler ODE sampler with CFG over the whole clip (bidirectional). -> x0 (B, F, C, H, W). trace: as
    rollout's, with the whole clip as its one chunk: trace["inputs"] = [[x at every Euler step]]."""
    B, sig = len(y), euler_sigmas(c).to(c.device)
    x, inputs = torch.randn(B, n_frames, 3, c.size, c.size, device=c.device), []
    for i in range(c.euler_steps):
        inputs.append(x)
        x = x + (sig[i + 1] - sig[i]) * guided(model, x, sig[i].expand(B, n_frames), y, c.cfg)
    if trace is not None:
        trace["inputs"] = [inputs]
    return x

# ####################################################################################################
# 7. Causal students: ODE init (the DMD generators' start), and the many-step TF / DF baselines

def chunk_sigmas(sig_choices, B, c):
    """A noise level per chunk, the same for the frames of a chunk: (B, F)."""
    idx = torch.randint(len(sig_choices), (B, c.frames // c.chunk), device=sig_choices.device)
    return sig_choices[idx].repeat_interleave(c.chunk, 1), idx.repeat_interleave(c.chunk, 1)

def causal_forward(model, x_noisy, sigma, y, c, context, x_clean=None):
    """The parallel (training) forward of a causal student -> v for the noisy frames (B, F, C, H, W).
    context "df": the noisy sequence under the block-causal mask (each chunk sees noisy earlier chunks).
    context "tf": [clean | noisy] under the teacher-forcing mask, SAME frame positions for both halves."""
    F = x_noisy.shape[1]
    if context == "df":
        return model(x_noisy, sigma, y, mask=block_causal_mask(F, c.chunk, device=c.device))
    pos = torch.arange(F, device=c.device).repeat(2)
    v = model(torch.cat([x_clean, x_noisy], 1), torch.cat([torch.zeros_like(sigma), sigma], 1), y,
              pos=pos, mask=teacher_forcing_mask(F, c.chunk, device=c.device))
    return v[:, F:]

# Why an ODE init: DMD needs a generator that already produces roughly the right videos in 4 steps, or the
# critic and the real score disagree everywhere. Regressing the causal student onto a teacher's
# deterministic noise -> video map (the probability-flow ODE) gives that, cheaply and in parallel.
# Whose ODE? The paper (after CausVid) uses the bidirectional teacher's. But there a frame's clean end
# depends on the noise of LATER frames too, which a causal student never sees: the best it can do is
# the average over them (blur, frozen motion). An AR teacher (the many-step TF model, sampled chunk by
# chunk) makes each chunk's end a function of its own noise and the clean earlier chunks, exactly what the
# student sees (Causal Forcing, Zhu et al. 2026, arXiv 2602.02214). `ode_teacher` picks; README measures.

@torch.no_grad()
def ode_trajectories(c, teacher, y):
    """One batch of ODE pairs -> xs (B, K, F, C, H, W), the states at the few-step grid's sigmas along
    the teacher's Euler trajectories, and x0 (B, F, C, H, W), their clean ends. bidir: the teacher samples
    the whole clip at once; tf: the TF model samples it chunk by chunk, its context its own clean chunks."""
    trace = {"inputs": []}  # per chunk, its input x at every Euler step
    if c.ode_teacher == "bidir":
        x0 = sample_teacher(teacher, c, y, c.frames, trace)
    else:
        x0 = rollout(teacher, y, c.frames, c, "euler", trace=trace)
    keep = range(0, c.euler_steps, c.euler_steps // c.few_steps)  # few-step sigma k = Euler index k * stride
    return torch.stack([torch.cat([steps[i] for steps in trace["inputs"]], 1) for i in keep], 1), x0

def train_ode(c, fresh=False):
    """CausVid / Self Forcing init: regress the block-causal student onto a teacher's ODE solution.
    Pairs: x at the few-step grid's sigmas along teacher trajectories -> the trajectory's clean end."""
    name, stage = ("teacher", "teacher") if c.ode_teacher == "bidir" else ("tf", "diffusion --context tf")
    teacher = build(c, load(os.path.join(c.out, name + ".pt"), c, stage)["ema"]).eval()
    # 16 x batch teacher trajectories, made afresh from the stage's seed by every run (resumed too), 256 at a time
    g = torch.Generator().manual_seed(c.seed + 7)
    ys = torch.randint(0, teacher.n_classes, (16 * c.batch,), generator=g).to(c.device)
    xs, x0s = (torch.cat(t) for t in zip(*[ode_trajectories(c, teacher, ys[i:i + 256])
                                            for i in tqdm(range(0, len(ys), 256), desc="ode pairs")]))
    model = build(c, teacher.state_dict())  # start from the teacher's weights (made causal by the mask)
    ema, opt = copy.deepcopy(model).requires_grad_(False), adamw(model, c.lr * 0.3)
    grid = few_step_sigmas(c).to(c.device)
    # The student's context is what its teacher's was: for bidir the other chunks' noisy states on the
    # same trajectory (block-causal mask, CausVid), for tf the clean earlier chunks (teacher-forcing mask).
    context = "df" if c.ode_teacher == "bidir" else "tf"

    def step(it):
        # Each chunk gets its own random point of the 4-step grid, read off its trajectory; the target is
        # the trajectory's clean end. All chunks at once, in one parallel pass.
        i = torch.randint(len(xs), (c.batch,), device=c.device)
        sigma, k = chunk_sigmas(grid, c.batch, c)  # a random grid point per chunk
        x_t = xs[i][torch.arange(c.batch, device=c.device)[:, None], k, torch.arange(c.frames, device=c.device)]
        x0_hat = x_t - sigma[..., None, None, None] * causal_forward(model, x_t, sigma, ys[i], c, context, x0s[i])
        optimize(opt, loss := Fn.mse_loss(x0_hat, x0s[i]), model)
        return {"loss": loss}

    return train(c, "ode", {"model": model, "ema": ema, "opt": opt}, graphed(c, step), c.ode_iters, EMA, fresh)

# TF and DF are the two ways to train a causal model on real videos in parallel (paper Sec. 2, Fig. 2a-b).
# Both see only REAL frames as context during training; at inference both see their own outputs. That
# train-test mismatch (exposure bias) is what Self Forcing removes.

def train_diffusion(c, context, fresh=False):
    """Many-step causal baselines by flow matching on real clips, a noise level per chunk (official).
    TF: each noisy chunk sees the CLEAN real earlier chunks. DF: it sees the NOISY real earlier chunks."""
    teacher = load(os.path.join(c.out, "teacher.pt"), c, "teacher")
    data, model = Data(c), build(c, teacher["ema"])
    ema, opt = copy.deepcopy(model).requires_grad_(False), adamw(model, c.lr * 0.3)

    def step(it):
        x0, y = data.batch(c.batch)
        sigma = sample_sigma(c.batch, c.frames // c.chunk, c).repeat_interleave(c.chunk, 1)  # one per chunk
        eps = torch.randn_like(x0)
        v = causal_forward(model, add_noise(x0, sigma, eps), sigma, drop_labels(y), c, context, x_clean=x0)
        optimize(opt, loss := Fn.mse_loss(v, eps - x0), model)
        return {"loss": loss}

    return train(c, context, {"model": model, "ema": ema, "opt": opt}, graphed(c, step), c.diffusion_iters, EMA,
                 fresh)

# ####################################################################################################
# 8. Autoregressive rollout: Algorithm 1 (training) and inference are the SAME loop

def rollout(model, y, n_frames, c, sampler="few", exit_step=None, noise=None, window=None, sink=0, trace=None):
    """Generate n_frames chunk by chunk with the KV cache, exactly as at inference. -> (B, F, C, H, W).

    Per chunk (Alg. 1): start from noise; for k = 0..s: x0_hat = x - sigma_k v(x, sigma_k), then re-noise
    x0_hat to sigma_{k+1}. The chunk's output is x0_hat of the exit step s. Finally the clean output is run
    once more at sigma = 0 to write its keys/values into the cache (the "cache refresh": later chunks see
    clean context, as at inference).
    sampler "few": the K-step generator (few_step_sigmas, re-noised with FRESH noise, consistency-style,
      no CFG); "euler": the many-step TF / DF models (the Euler grid, re-noised with the model's own noise
      estimate, which is exactly an Euler step, CFG c.cfg).
    exit_step: None for inference (the last step). Self Forcing training passes s ~ U{0..K-1}, shared by
      every chunk, with grad enabled: steps before s run under no_grad, step s with grad (stochastic
      gradient truncation, Sec. 3.2), the refresh under no_grad; c.kv_grad says whether gradient passes
      through the cache into the exit steps of earlier chunks ("st") or not ("detach"). A (B,) tensor (no
      grad): a batch of rollouts with their own exit steps (a GPU's critic); every step runs, each keeps its own.
    noise (B, n_frames, C, H, W): the chunks' starting noise (default: drawn). window, sink: the cache's
      size in frames (default c.frames, the training length) and its never-evicted first frames.
    trace: a dict that collects the model calls, grad_calls, the frames each chunk attended to (seen) and,
      if it has the key "inputs", every chunk's input x at every step (the AR teacher's ODE pairs)."""
    B, ch, euler = len(y), c.chunk, sampler == "euler"
    sigmas, cfg = (euler_sigmas(c)[:-1].tolist(), c.cfg) if euler else (few_step_sigmas(c).tolist(), 1.0)
    s = len(sigmas) - 1 if exit_step is None else exit_step  # inference: always exit at the last step
    train_mode = torch.is_grad_enabled()  # the caller decides: no_grad for sampling, grad for Alg. 1
    per_sample = torch.is_tensor(s)  # (B,) exit steps (no grad): all K steps run, each sample keeps its own
    last = len(sigmas) - 1 if per_sample else s
    cache = KVCache(len(model.blocks), model.N, window or c.frames, sink)  # fresh per rollout; rolls past window
    trace, out = {} if trace is None else trace, []  # out: the chunks' outputs
    for f0 in range(0, n_frames, ch):  # Alg. 1 line 3: for each chunk i = 1..N
        pos = range(f0, f0 + ch)  # ABSOLUTE frame indices (RoPE, cache slots)
        # Alg. 1 line 4: the chunk starts from pure Gaussian noise, x (B, ch, C, H, W)
        x = torch.randn(B, ch, 3, c.size, c.size, device=c.device) if noise is None else noise[:, f0:f0 + ch]
        inputs = []
        # Alg. 1 lines 5-12: denoise with the K-step schedule, stopping at the exit step s.
        # Only step s builds an autograd graph: the memory of one pass per chunk, however many steps.
        for k in range(last + 1):
            inputs.append(x)
            sigma = torch.full((B, ch), sigmas[k], device=c.device)  # (B, ch)
            with torch.set_grad_enabled(train_mode and k == s):
                x0_k = x - sigmas[k] * guided(model, x, sigma, y, cfg, pos=pos, cache=cache)  # (B, ch, C, H, W)
            # per-sample exit steps: a sample past its own keeps the x0_hat it exited with
            x0_hat = torch.where((s < k).view(B, 1, 1, 1, 1), x0_hat, x0_k) if per_sample and k else x0_k
            trace["calls"] = trace.get("calls", 0) + 1
            trace["grad_calls"] = trace.get("grad_calls", 0) + int(x0_hat.requires_grad)
            if k < last:  # re-noise to the next level
                eps = (x - (1 - sigmas[k]) * x0_k) / sigmas[k] if euler else torch.randn_like(x)
                x = ((1 - sigmas[k + 1]) * x0_k + sigmas[k + 1] * eps).detach()
        trace.setdefault("seen", []).append(list(cache.frames))  # the frames this chunk attended to
        if "inputs" in trace:
            trace["inputs"].append(inputs)
        out.append(x0_hat)  # Alg. 1 line 13: the chunk's output (B, ch, C, H, W), with grad at the exit step
        # Alg. 1 line 14: write the chunk's keys/values computed from its CLEAN output (sigma = 0).
        # Later chunks attend to these, exactly as at inference: this is what makes the context the
        # model's own. Not needed after the last chunk.
        if f0 + ch < n_frames:
            cache.straight_through = train_mode and c.kv_grad == "st"
            with torch.no_grad():
                guided(model, x0_hat.detach(), torch.zeros(B, ch, device=c.device), y, cfg, pos=pos, cache=cache)
            cache.straight_through = False
            trace["calls"] += 1
    return torch.cat(out, 1)  # (B, n_frames, C, H, W)

@torch.no_grad()
def generate(model, kind, y, n_frames, c, noise=None, sink=0):
    """Inference for each method, 256 videos at a time: 'teacher' bidirectional Euler; 'euler' AR many-step
    (TF / DF) with CFG; 'few' AR 4-step (ODE init, DMD generators) without CFG. -> (B, F, C, H, W) in [-1, 1]."""
    out = []
    for i in range(0, len(y), 256):
        z = None if noise is None else noise[i:i + 256, :n_frames]
        out.append(sample_teacher(model, c, y[i:i + 256], n_frames) if kind == "teacher" else
                   rollout(model, y[i:i + 256], n_frames, c, kind, noise=z, sink=sink))
    return torch.cat(out).clamp(-1, 1)

# ####################################################################################################
# 9. DMD with a trained critic (Sec. 3.3): Self Forcing, TF+DMD and DF+DMD

# DMD compares the two scores at ONE random noise level per video, not per frame: the teacher and the
# critic are bidirectional models trained with one level per clip, and the loss judges the whole video.

def score_sigma(B, c, device):
    """One DMD noise level per video: uniform, shifted, clamped to [0.02, 0.98] (official)."""
    return shift(torch.rand(B, 1, device=device)).clamp(0.02, 0.98).expand(-1, c.frames)

def dmd_loss(x, y, teacher, critic, c):
    """Distribution matching distillation (Eq. 5-6, the official form). x (B, F, C, H, W) generated with
    grad. The gradient of KL(p_gen || p_data) w.r.t. x is the difference of the two scores at a random
    noise level; in x0 terms: (x0_fake - x0_real), normalised per sample. Returns the surrogate loss
    0.5 ||x - (x - grad).detach()||^2, whose gradient w.r.t. x is exactly grad / numel."""
    with torch.no_grad():  # the scores are targets: no gradient through teacher or critic
        sigma = score_sigma(len(x), c, x.device)
        x_t = add_noise(x, sigma, torch.randn_like(x))  # diffuse the generated video to a random level
        s = sigma[..., None, None, None]
        x0_real = x_t - s * guided(teacher, x_t, sigma, y, c.real_cfg)  # real score: the teacher, with CFG
        x0_fake = x_t - s * critic(x_t, sigma, y)  # fake score: the critic, not the generator
        # descending along grad moves x toward what the teacher would denoise it to (x0_real) and away
        # from what the critic, a model of the generator's own distribution, would (x0_fake). Were the
        # generator perfect (critic == teacher), grad vanishes only at real_cfg = 1: with guidance the
        # real score is sharper than the data, and (real_cfg - 1) sigma (v_c - v_u) / norm remains (tested)
        norm = (x - x0_real).abs().mean((1, 2, 3, 4), keepdim=True)  # per-sample step size (DMD)
        grad = torch.nan_to_num((x0_fake - x0_real) / norm)
    return 0.5 * Fn.mse_loss(x, (x - grad).detach())

def distilled_name(c, context):
    """distill --context self | tf | df -> sf | tf_dmd | df_dmd; with the Sec. 3.4 restriction: sf_restrict."""
    return {"self": "sf", "tf": "tf_dmd", "df": "df_dmd"}[context] + "_restrict" * (context == "self" and c.restrict)

def distill(c, context, fresh=False):
    """Generator: ODE init. Real score: the frozen teacher. Critic: its own copy of the teacher, trained
    by flow matching on the generator's (detached) outputs, critic_ratio updates per generator update."""
    teacher = build(c, load(os.path.join(c.out, "teacher.pt"), c, "teacher")["ema"]).eval().requires_grad_(False)
    gen = build(c, load(os.path.join(c.out, "ode.pt"), c, "ode")["ema"])
    critic = build(c, teacher.state_dict())  # never the generator: its own network
    ema = copy.deepcopy(gen).requires_grad_(False)
    opt_g, opt_c = adamw(gen, c.lr_gen, betas=(0.0, 0.999)), adamw(critic, c.lr_critic, betas=(0.0, 0.999))
    data = Data(c) if context != "self" else None
    grid = few_step_sigmas(c).to(c.device)

    # The only difference between the three methods is where the generator's training videos come from:
    # its own KV-cache rollout from noise (Self Forcing), or one parallel pass over noised REAL clips with
    # clean (TF+DMD) or noisy (DF+DMD) real context. Everything after that, DMD and critic, is shared.
    def draw(n):
        """Labels for n rollouts of c.batch clips (n batch,) and, for Self Forcing, their exit steps, a list of n
        (Alg. 1: s ~ U{0..K-1}, one per rollout, shared by its chunks); None for TF+DMD and DF+DMD."""
        y = torch.randint(0, gen.n_classes, (n * c.batch,), device=c.device)
        s = torch.randint(c.few_steps, (n,)).tolist() if context == "self" else None
        if s is not None and c.exit_step == "last":  # ablation: exit where inference does; steps < K-1 never
            s = [c.few_steps - 1] * n  # get a gradient (drawn above all the same: one random stream)
        return y, s

    def generate_train(y, s):
        """The generator's videos for the DMD loss (grad enabled only where the method allows)."""
        if context == "self":  # Alg. 1: its own rollout, the exit step s shared by all chunks
            # Sec. 3.4 `restrict`: a cache one chunk short, so the last chunk cannot see the first, as a
            # chunk far past the training length cannot
            return rollout(gen, y, c.frames, c, exit_step=s, window=c.frames - c.chunk * c.restrict), y
        x_real, y = data.batch(len(y))  # CausVid: one parallel pass from real-data context
        sigma, _ = chunk_sigmas(grid, len(y), c)
        x_t = add_noise(x_real, sigma, torch.randn_like(x_real))
        v = causal_forward(gen, x_t, sigma, y, c, context, x_clean=x_real)
        return x_t - sigma[..., None, None, None] * v, y

    # The critic must track the generator's current distribution, so it is updated first, more often, each
    # time on fresh videos: its flow-matching loss on generated videos makes critic(x_t) the score of p_gen, as
    # the teacher's loss on real videos made it the score of p_data. The generator does not change in between,
    # so its critic_ratio batches are rolled out first: on a GPU as ONE batch (s per clip: fewer, larger calls),
    # on a CPU one by one (s a list: each rollout stops at its own exit step, less arithmetic). Both i.i.d.
    def critic_updates(y, s):
        with torch.no_grad():
            xs, ys = generate_train(y, s) if s is None or torch.is_tensor(s) else \
                [torch.cat(t) for t in zip(*map(generate_train, y.split(c.batch), s))]
        for x, y in zip(xs.split(c.batch), ys.split(c.batch)):
            # Official: at the noise levels DMD queries it at (score_sigma, mostly near 1); critic_sigma=teacher:
            # at the teacher's own logit-normal levels
            sigma = (score_sigma if c.critic_sigma == "dmd" else clip_sigma)(c.batch, c, c.device)
            optimize(opt_c, loss := flow_matching_loss(critic, x, y, sigma), critic)
        return loss

    def generator_update(y, s):  # one rollout with grad (Alg. 1), judged as a whole video by DMD
        x, y = generate_train(y, s)
        optimize(opt_g, loss := dmd_loss(x, y, teacher, critic, c), gen)
        return loss

    graphs = Graphs(c)  # on a GPU: one graph for the critic's updates, one per exit step for the generator's

    def step(it):
        y, s = draw(c.critic_ratio)
        if s and torch.device(c.device).type in BATCHED:  # an exit step per clip, on the device (a graph's input)
            s = torch.tensor(s, device=c.device).repeat_interleave(c.batch)
        lc = graphs("critic", critic_updates, y, s)
        y, s = draw(1)
        s = s and s[0]  # the generator's one rollout: one exit step (None for TF+DMD and DF+DMD)
        return {"dmd": graphs(("generator", s), generator_update, y, s), "critic": lc}

    nets = {"model": gen, "ema": ema, "critic": critic, "opt_g": opt_g, "opt_c": opt_c}
    return train(c, distilled_name(c, context), nets, step, c.distill_iters, EMA_DMD, fresh)

# ####################################################################################################
# 10. Evaluation: every method, same labels and seeds, at 1x and far past the training length

METHODS = [  # (checkpoint, label, sampler)
    ("teacher", "teacher (bidir, many-step)", "teacher"), ("tf", "TF (many-step)", "euler"),
    ("df", "DF (many-step)", "euler"), ("ode", "ODE init (4-step)", "few"), ("tf_dmd", "TF+DMD (4-step)", "few"),
    ("df_dmd", "DF+DMD (4-step)", "few"), ("sf", "Self Forcing (4-step)", "few")]

def nfe_per_frame(kind, c, n_frames):
    """Sampling cost as the paper counts it: network evaluations per generated frame (a CFG pass counts
    twice). The AR methods pay one extra pass per chunk for the cache refresh (none after the last chunk)."""
    chunks, (steps, mult) = n_frames // c.chunk, (c.few_steps, 1) if kind == "few" else (c.euler_steps, 2)
    return 2 * c.euler_steps if kind == "teacher" else mult * (chunks * steps + chunks - 1) / n_frames

def eval_noise(c, L):
    """ONE starting noise for every method, the RNG re-seeded (fresh noise repeats too): rows differ by method."""
    torch.manual_seed(c.seed + 99)
    return torch.randn(c.n_eval, L, 3, c.size, c.size, device=c.device)

def evaluate(c, long=False, need=()):
    """Scores every trained method with toy_data's metrics on the same labels and noise. The table: quality
    at 1x and LONG x the training length (results.md/json, compare.gif), and one sample of each rolled out
    to 16x for the figure (trails.png). long: quality per segment up to 16x (results_long.md/json).
    need: the methods that must be there (the demo's), or nothing is written."""
    L = c.frames * (mult := 16 if long else LONG)
    ev = toy_data.EvalSet(c.n_eval, L, c.frames, c.size, c.n_objects, c.radius, c.speed, c.seed, c.gravity)
    y, results, videos, trails = torch.from_numpy(ev.labels).to(c.device), ev.results, ev.videos, ev.trails
    runs = [(n, label, kind, 0) for n, label, kind in METHODS if not (long and kind == "teacher")]
    if long:  # Self Forcing with a sink (its first chunk kept in the cache forever), and restricted (Sec. 3.4)
        runs += [("sf", f"SF + sink of {c.chunk}", "few", c.chunk), ("sf_restrict", "SF, restricted", "few", 0)]
    missing = [r for r in runs if not os.path.exists(os.path.join(c.out, r[0] + ".pt"))]
    if len(missing) == len(runs) or {r[0] for r in missing} & set(need):
        raise UserError(f"cannot evaluate {c.out}: no {', '.join(r[0] + '.pt' for r in missing)} (train them first)")
    for name, label, *_ in missing:
        print(f"[eval] left out {label}: no {name}.pt in {c.out}")
    for name, label, kind, sink in [r for r in runs if r not in missing]:
        model = build(c, load(os.path.join(c.out, name + ".pt"), c, name)["ema"]).eval()
        n = c.frames if kind == "teacher" else L  # the bidirectional teacher makes one clip of its length
        generate(model, kind, y[:256], c.frames, c)  # untimed warm-up: first calls pay one-time costs
        noise = eval_noise(c, L)  # (after the warm-up: the scored videos do not depend on it, tested)
        t0 = time.time()
        vids = generate(model, kind, y, n, c, noise, sink).cpu().numpy()  # (n_eval, n, C, H, W)
        r = {"label": label, "nfe_per_frame": nfe_per_frame(kind, c, n),
             "ms_per_frame": 1000 * (time.time() - t0) / (c.n_eval * n),  # batched wall-clock (.cpu() waits)
             "1x": ev.score(vids, c.frames)}  # a causal rollout's first frames: its 1x video
        if kind != "teacher":
            r["long"] = ev.score(vids, L)
        results[name + (f"_sink{sink}" if sink else "")], videos[name] = r, vids[0]
        if not long and kind != "teacher":  # the figure: the first sample, rolled out to 16x
            torch.manual_seed(c.seed + 98)  # the same noise for every method
            trails[label] = generate(model, kind, y[:1], 16 * c.frames, c)[0].cpu().numpy()
        print(f"[eval] {label}: quality 1x {r['1x']['all']['quality']:.3f}"
              + (f", {mult}x {r['long']['all']['quality']:.3f}" if "long" in r else ""))
    toy_data.write_eval(c.out, f"Device {c.device}, n_eval={c.n_eval}, {c.frames} frames (1x), {L} ({mult}x), "
                        f"chunk={c.chunk}, seed {c.seed}.", results, videos, None if long else trails)
    return results

# ####################################################################################################
# 11. CLI

def sample_stage(c, name, n_videos, n_frames):
    kind = {m: k for m, _, k in METHODS}[name]  # name: one of METHODS (argparse checks)
    model = build(c, load(os.path.join(c.out, name + ".pt"), c, name)["ema"]).eval()
    torch.manual_seed(c.seed)
    y = torch.arange(n_videos, device=c.device) % model.n_classes
    toy_data.write_samples(os.path.join(c.out, f"samples_{name}"), generate(model, kind, y, n_frames, c).cpu().numpy(),
                           y.cpu().numpy())

def parse(argv):  # the stages and their options: toy_data.STAGES
    return toy_data.parse_cli(argv, Config, PRESETS, [m for m, _, _ in METHODS])

PIPELINE = [("teacher", None), ("diffusion", "tf"), ("diffusion", "df"), ("ode", None), ("distill", "df"),
            ("distill", "self")]  # the demo's stages, in order

def run_stage(c, stage, context=None, fresh=False):
    """One stage, from its own seed: the demo, which runs every stage in one process, gives the same
    checkpoints as the stages run one by one, whatever ran before (no stage depends on RNG order)."""
    torch.manual_seed(c.seed)
    return {"teacher": lambda: train_teacher(c, fresh), "ode": lambda: train_ode(c, fresh),
     "diffusion": lambda: train_diffusion(c, context, fresh), "distill": lambda: distill(c, context, fresh)}[stage]()

def bench(c, n):
    """Seconds per training step of every stage, in one run on this device, in a throwaway folder. On a GPU, with
    the fast path (CUDA graphs) and without, and how far apart the two runs' weights end (the same computation)."""
    t, modes = {}, ("graphs", "eager") if Graphs(c).on else ("eager",)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            c.graphs, c.out = mode == "graphs", toy_data.writable(os.path.join(tmp, mode), UserError)
            for stage, ctx in PIPELINE[:4] + [("distill", "tf")] + PIPELINE[4:]:
                name = distilled_name(c, ctx) if stage == "distill" else ctx or stage
                for iters in (3, 3 + n):  # 3 steps of warm-up, then n more, resumed from them: timed
                    setattr(c, stage + "_iters", iters)
                    t[name, mode] = run_stage(c, stage, ctx)
        diff = {name: toy_data.weight_diff(*(os.path.join(tmp, m, name + ".pt") for m in modes))
                for name in {k for k, _ in t}} if len(modes) == 2 else {}  # same seed, same steps: 0 if the same
    return toy_data.bench_table(t, diff, modes, c.device, n)

def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        c = toy_data.make_config(args, Config, PRESETS, HEADS, UserError)  # preset + flags, checked; device, folder
        torch.backends.cuda.matmul.allow_tf32 = True  # GPU matmuls in TF32 (no effect elsewhere)
        print("config:", dataclasses.asdict(c))
        if args.stage == "demo":
            t0 = time.time()
            for stage, ctx in PIPELINE:
                if stage != "teacher" or args.fresh or not pretrained_teacher(c):
                    run_stage(c, stage, ctx, args.fresh)
                print(f"[demo] {stage} {ctx or ''} finished at {time.time() - t0:.0f}s")
            evaluate(c, need=("teacher", "tf", "df", "ode", "df_dmd", "sf"))
            print(f"[demo] done in {time.time() - t0:.0f}s")
        elif args.stage == "sample":
            sample_stage(c, args.model, args.n, c.frames if args.n_frames is None else args.n_frames)
        elif args.stage == "bench":
            bench(c, args.n)
        elif args.stage == "eval":
            evaluate(c, args.long)
        else:
            run_stage(c, args.stage, args.context, args.fresh)
    except KeyboardInterrupt:  # outside a training loop (data, ODE pairs, evaluation): nothing half-written
        print("\ninterrupted: finished checkpoints are kept, the same command goes on from them", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        print(f"{'error: ' * (e.code == 2)}{e}", file=sys.stderr)
        sys.exit(e.code)

if __name__ == "__main__":
    main()
