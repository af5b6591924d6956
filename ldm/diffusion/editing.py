"""The math of editing, for any sampler: SDEdit start states, known-region blending, DDIM inversion, slerp.

A mode is a start state plus a per-step hook; the samplers stay as they are.

- img2img (SDEdit, Meng et al. 2022): `strength` s picks the start timestep t_s = ⌈s·T⌉ − 1; the sampler runs
  on the schedule truncated to [0, t_s] (same ᾱ, same network timesteps) from z0 forward-noised to the level
  of the sampler's first network call (found by a probe call that costs no network evaluation).
- Inpainting by latent blending (Lugmayr et al. 2022, Avrahami et al. 2023): on every network call the
  known region of the state is replaced by the known latent forward-noised to that level, and the
  predicted x0 takes the known latent there; every sampler asks the Denoiser for x0 at each step, so the
  blending lives in a Denoiser wrapper (sampler callbacks only observe a step). The final latent is pasted.
- Deterministic DDIM inversion (Song et al. 2021, §4.3; Mokady et al. 2023): run the η = 0 DDIM update
  upwards in ᾱ; sampling the result with DDIM on the same timesteps gives the image back.
- slerp: spherical interpolation of two noises (or embeddings), keeping their norm statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser, DenoiserOutput
from ldm.diffusion.samplers.common import timestep_batch
from ldm.diffusion.samplers.spacing import spaced_timesteps
from ldm.diffusion.schedule import NoiseSchedule


# ---- img2img ------------------------------------------------------------------------------------------
def check_strength(strength: float) -> float:
    strength = float(strength)
    if not 0.0 <= strength <= 1.0 or math.isnan(strength):
        raise ValueError(f"strength must be in [0, 1] (0: the input unchanged, 1: from pure noise), got {strength}")
    return strength


def start_timestep(strength: float, num_timesteps: int) -> int | None:
    """t_s = ⌈strength·T⌉ − 1 (strength 1 → T − 1, the full schedule); None for strength 0 (nothing to do)."""
    strength = check_strength(strength)
    if strength == 0.0:
        return None
    return max(0, min(num_timesteps - 1, math.ceil(strength * num_timesteps) - 1))


def truncate_schedule(schedule: NoiseSchedule, t_start: int) -> NoiseSchedule:
    """The first t_start + 1 timesteps of `schedule`: same β, hence the same ᾱ_t for t ≤ t_start."""
    if not 0 <= t_start < schedule.num_timesteps:
        raise ValueError(f"t_start must be in [0, {schedule.num_timesteps - 1}], got {t_start}")
    if t_start == schedule.num_timesteps - 1:
        return schedule
    out = NoiseSchedule(schedule.betas[: t_start + 1])
    out.name = f"{getattr(schedule, 'name', 'schedule')}[:{t_start + 1}]"
    out.zero_terminal_snr = False  # the last kept ᾱ is > 0
    return out


def truncated_denoiser(denoiser: Denoiser, t_start: int) -> Denoiser:
    """`denoiser` on the schedule truncated at t_start (network timesteps unchanged: they are a prefix)."""
    schedule = truncate_schedule(denoiser.schedule, t_start)
    if schedule is denoiser.schedule:
        return denoiser
    return _rebind(denoiser, schedule)


def _rebind(denoiser: Denoiser, schedule: NoiseSchedule) -> Denoiser:
    """A copy of `denoiser` (its class and state, e.g. a KnownRegionDenoiser) on another schedule."""
    out = object.__new__(type(denoiser))
    out.__dict__.update(denoiser.__dict__)
    out.schedule = schedule
    return out


class _Probed(Exception):
    pass


def alpha_bar_at(schedule: NoiseSchedule, t: float) -> float:
    """ᾱ at a (possibly continuous) timestep: log σ interpolated linearly, the inverse of `sigma_to_t`."""
    log_sigmas = schedule.sigmas.log()
    lo = min(max(int(math.floor(t)), 0), schedule.num_timesteps - 1)
    hi = min(lo + 1, schedule.num_timesteps - 1)
    w = min(max(t - lo, 0.0), 1.0)
    sigma = math.exp((1 - w) * float(log_sigmas[lo]) + w * float(log_sigmas[hi]))
    return 1.0 / (1.0 + sigma**2)


def first_call_level(sampler: Callable, denoiser: Denoiser, steps: int, **options) -> tuple[float, float]:
    """(k, ᾱ) of the sampler's first network call: the network sees k·x_T, at noise level ᾱ. Found by running
    the sampler on a probe that stops at its first call, so it holds for every sampler and spacing."""
    seen = {}

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        seen["k"], seen["t"] = float(x.flatten()[0]), float(torch.as_tensor(t).flatten()[0])
        raise _Probed

    probe = Denoiser(model_fn, denoiser.schedule, denoiser.prediction_type, denoiser.variance_type)
    try:
        sampler(probe, torch.ones(1, 1, 1, 1, dtype=torch.float64), steps, **options)
    except _Probed:
        pass
    if "k" not in seen:
        raise RuntimeError(f"sampler {getattr(sampler, '__name__', sampler)} made no network call")
    return seen["k"], alpha_bar_at(denoiser.schedule, seen["t"])


def noised_start(sampler: Callable, denoiser: Denoiser, z0: Tensor, noise: Tensor, steps: int,
                 **options) -> Tensor:
    """The x_T to hand `sampler` so that its first network call sees √ᾱ z0 + √(1−ᾱ) ε at that call's level."""
    k, ab = first_call_level(sampler, denoiser, steps, **options)
    return (math.sqrt(ab) * z0 + math.sqrt(1 - ab) * noise) / k


def img2img_steps(steps: int, strength: float) -> int:
    """Steps actually run at `strength` (as diffusers: int(steps·strength), at least 1)."""
    return max(1, int(int(steps) * check_strength(strength)))


def sdedit(sampler: Callable, denoiser: Denoiser, z0: Tensor, strength: float, steps: int, noise: Tensor,
           **sampler_kwargs) -> Tensor:
    """SDEdit: z0 noised to strength·T, then denoised by `sampler` with int(steps·strength) steps.
    strength 0 returns z0 itself. `sampler_kwargs` go to the sampler (generator, callback, options)."""
    t_start = start_timestep(strength, denoiser.schedule.num_timesteps)
    if t_start is None:
        return z0
    den = truncated_denoiser(denoiser, t_start)
    n = min(img2img_steps(steps, strength), t_start + 1)
    options = {k: v for k, v in sampler_kwargs.items() if k not in ("generator", "callback", "progress")}
    x_T = noised_start(sampler, den, z0, noise, n, **options)
    return sampler(den, x_T, n, **sampler_kwargs)


# ---- inpainting by latent blending --------------------------------------------------------------------
def mask_to_latent(mask: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """A pixel mask (B or 1, 1, H, W), 1 = repaint, 0 = keep, onto the latent grid: a latent cell is repainted if
    any of its pixels is (max-pool), so every kept latent cell covers kept pixels only."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W), got {tuple(mask.shape)}")
    h, w = latent_hw
    if mask.shape[-2] % h or mask.shape[-1] % w:
        return (F.interpolate(mask.float(), size=(h, w), mode="bilinear", align_corners=False) > 0).float()
    return F.adaptive_max_pool2d((mask > 0.5).float(), (h, w))


class KnownRegionDenoiser(Denoiser):
    """`inner` with the known region (mask 0) of the state and of the predicted x0 tied to `z_known`.

    At a call at level ᾱ the network sees m·x_t + (1−m)·(√ᾱ z_known + √(1−ᾱ) ε_known); it returns
    x0 = m·x̂0 + (1−m)·z_known, and ε consistent with that blended input. m = `mask` (1 = repaint) on the latent
    grid, ε_known fixed for the whole run (one noised known trajectory, as DDIM)."""

    def __init__(self, inner: Denoiser, z_known: Tensor, mask: Tensor, noise: Tensor):
        super().__init__(inner.model_fn, inner.schedule, inner.prediction_type, inner.variance_type, inner.clip_x0)
        if mask.shape[-2:] != z_known.shape[-2:]:
            raise ValueError(f"latent mask {tuple(mask.shape)} does not match the latents {tuple(z_known.shape)}")
        self.z_known, self.mask, self.noise = z_known, mask.to(z_known), noise.to(z_known)

    def _blend_input(self, x_t: Tensor, sqrt_ab: Tensor, sqrt_1mab: Tensor) -> Tensor:
        known = sqrt_ab * self.z_known + sqrt_1mab * self.noise
        return self.mask * x_t + (1 - self.mask) * known

    def __call__(self, x_t: Tensor, t: Tensor) -> DenoiserOutput:
        s = self.schedule
        sqrt_ab = s.gather("sqrt_alphas_cumprod", t, x_t)
        sqrt_1mab = s.gather("sqrt_one_minus_alphas_cumprod", t, x_t)
        x_in = self._blend_input(x_t, sqrt_ab, sqrt_1mab)
        out = super().__call__(x_in, t)
        x0 = self.mask * out.x0 + (1 - self.mask) * self.z_known
        return DenoiserOutput(pred=out.pred, x0=x0, eps=(x_in - sqrt_ab * x0) / sqrt_1mab, var_values=out.var_values)

    def denoise_sigma(self, x: Tensor, sigma: Tensor) -> Tensor:
        sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        x_in = self.mask * x + (1 - self.mask) * (self.z_known + sig * self.noise)  # VE view: x0 + σ ε
        return self.mask * super().denoise_sigma(x_in, sigma) + (1 - self.mask) * self.z_known


def paste_known(x: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """x where mask = 1 (repainted), `known` where mask = 0: exact, for latents or pixels."""
    return torch.where(mask > 0.5, x, known.to(x))


@torch.no_grad()
def repaint_ddim(denoiser: KnownRegionDenoiser, x_T: Tensor, steps: int, resample: int = 2,
                 generator: torch.Generator | None = None, spacing: str = "leading", steps_offset: int = 0,
                 progress: bool = False) -> Tensor:
    """RePaint-style resampling (Lugmayr et al. 2022) on η = 0 DDIM steps: each step t → t_prev is taken `resample`
    times, re-noising x_prev back to t in between (x_t = √(ᾱ_t/ᾱ_prev) x_prev + √(1 − ᾱ_t/ᾱ_prev) z), so the
    generated region harmonises with the known one. resample=1 is plain DDIM with blending. Jump length 1."""
    from ldm.diffusion.samplers.common import randn_like, step_range

    if int(resample) < 1:
        raise ValueError(f"resample must be >= 1, got {resample}")
    ts = spaced_timesteps(denoiser.schedule.num_timesteps, steps, spacing, steps_offset).tolist()
    ab = denoiser.schedule.alphas_cumprod
    x = x_T
    for i in step_range(len(ts), progress, "repaint"):
        ab_t, ab_prev = float(ab[ts[i]]), float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        passes = int(resample) if ab_prev < 1.0 else 1  # the last step (to the data) is not re-noised
        for r in range(passes):
            out = denoiser(x, timestep_batch(ts[i], x))
            x_prev = math.sqrt(ab_prev) * out.x0 + math.sqrt(1 - ab_prev) * out.eps
            if r + 1 < passes:
                ratio = ab_t / ab_prev
                x = math.sqrt(ratio) * x_prev + math.sqrt(1 - ratio) * randn_like(x_prev, generator)
        x = x_prev
    return x


# ---- DDIM inversion -----------------------------------------------------------------------------------
@torch.no_grad()
def ddim_invert(denoiser: Denoiser, z0: Tensor, steps: int, spacing: str = "leading", steps_offset: int = 0,
                callback: Callable[[dict], None] | None = None) -> Tensor:
    """The noise x_T that η = 0 DDIM (same steps, spacing, offset) maps back to ≈ z0.

    Visits the sampler's timesteps in ascending order; step i goes from level ᾱ_{t_{i−1}} (ᾱ = 1 at the data) to
    ᾱ_{t_i} with x_next = √ᾱ_{t_i} x̂0 + √(1−ᾱ_{t_i}) ε̂, (x̂0, ε̂) the prediction at the current state and t_i
    (the usual approximation ε(x_{t_{i−1}}) ≈ ε(x_{t_i}); exact as the steps shrink)."""
    ts = spaced_timesteps(denoiser.schedule.num_timesteps, steps, spacing, steps_offset).flip(0).tolist()
    ab_table = denoiser.schedule.alphas_cumprod
    x, ab_cur = z0, 1.0
    for i, t in enumerate(ts):
        out = denoiser(x, timestep_batch(t, x))
        ab_next = float(ab_table[t])
        eps = out.eps
        x0 = (x - math.sqrt(1 - ab_cur) * eps) / math.sqrt(ab_cur)  # the state's own level (x itself at the data)
        x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
        ab_cur = ab_next
    return x


# ---- interpolation ------------------------------------------------------------------------------------
def slerp(a: Tensor, b: Tensor, t: float | Tensor, eps: float = 1e-7) -> Tensor:
    """Spherical interpolation per sample (all non-batch dims flattened): sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b.
    Falls back to linear interpolation when a and b are (anti)parallel within `eps`. t = 0 → a, t = 1 → b."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device)
    fa, fb = a.double().flatten(1), b.double().flatten(1)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-30)
    theta = cos.clamp(-1, 1).acos()
    sin = theta.sin()
    linear = sin.abs() < eps
    safe = torch.where(linear, torch.ones_like(sin), sin)
    wa = torch.where(linear, 1 - t, ((1 - t) * theta).sin() / safe)
    wb = torch.where(linear, t.expand_as(theta), (t * theta).sin() / safe)
    out = wa[:, None] * fa + wb[:, None] * fb
    return out.reshape(a.shape).to(a.dtype)
