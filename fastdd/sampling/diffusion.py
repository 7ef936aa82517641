"""Gaussian diffusion of the ADM / IDDPM code (as used by the official DiT), as tables plus pure step functions.

Tables are computed once in float64 (numpy, like IDDPM) for the *respaced* process and kept as float64 CPU
tensors; `tables(device, dtype)` returns cached copies on a device so a sampling step does no host work.
Respaced index i runs over 0..N-1 (N-1 = noisiest); `timesteps[i]` is the original timestep (0..T-1) that
the model receives. Step functions take tensors and an index i that is either a Python int (same for the
whole batch) or an integer tensor of shape [B] (one index per row; its values are not checked, to avoid a
host sync). They never call .item() or branch on tensor values. Their arithmetic runs in float32, or in
float64 when x_t is float64.

Conventions reproduced from IDDPM:
- "linear" betas: linspace(1e-4 · 1000/T, 0.02 · 1000/T, T) in float64.
- Respacing (`space_timesteps`, section string "50"): the kept timesteps of a section of `size` steps with
  `count` kept are round(p_k), p_k = p_{k-1} + (size-1)/(count-1) accumulated in floats (so a tie such as
  7 · 99/14 = 49.5 comes out as 49.4999… -> 49), Python rounding; the respaced betas are
  1 - ᾱ[t_k] / ᾱ[t_{k-1}] (ᾱ[t_{-1}] = 1), so the respaced ᾱ equal the original ᾱ at the kept steps.
- Learned-range variance: log σ² = f · log β_i + (1 - f) · log σ̃²_i (clipped posterior variance),
  f = (v + 1) / 2 from the model's variance channels; no clipping of x̂0 unless clip_denoised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

Index = int | Tensor


def linear_betas(num_train_steps: int = 1000) -> np.ndarray:
    """ADM/IDDPM "linear" schedule, float64 [T]: from 1e-4 to 0.02, both scaled by 1000 / T."""
    scale = 1000.0 / num_train_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_train_steps, dtype=np.float64)


def space_timesteps(num_train_steps: int, section_counts: str | Sequence[int]) -> list[int]:
    """IDDPM respacing: the sorted original timesteps kept.

    section_counts: "ddimN" (every stride-th step from 0, stride the first giving exactly N steps), or a
    comma-separated string / sequence of counts: the T steps are cut into len(counts) equal sections
    (the first T % len(counts) one step longer) and section j keeps counts[j] evenly strided steps,
    frac_stride = (size - 1) / (count - 1), positions accumulated and rounded with Python's round().
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_train_steps):
                if len(range(0, num_train_steps, stride)) == desired:
                    return list(range(0, num_train_steps, stride))
            raise ValueError(f"section_counts: cannot create exactly {desired} steps with an integer stride")
        try:
            counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"section_counts: expected 'ddimN' or comma-separated ints, got {section_counts!r}"
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c <= 0 for c in counts):
        raise ValueError(f"section_counts: counts must be positive, got {counts}")
    size_per, extra = divmod(num_train_steps, len(counts))
    kept, start = [], 0
    for j, count in enumerate(counts):
        size = size_per + (1 if j < extra else 0)
        if size < count:
            raise ValueError(f"section_counts: cannot divide a section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += frac_stride
        start += size
    return sorted(set(kept))


def diffusers_timesteps(num_train_steps: int, num_steps: int, spacing: str, steps_offset: int = 0) -> list[int]:
    """diffusers' `timestep_spacing` ("leading": k · (T // N) + steps_offset, "trailing": round(T - k · T/N) - 1, as
    DDIMScheduler.set_timesteps), ascending."""
    if spacing == "leading":
        steps = (np.arange(num_steps) * (num_train_steps // num_steps)).round().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(num_train_steps, 0, -num_train_steps / num_steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"spacing: expected 'leading' or 'trailing', got {spacing!r}")
    return sorted(int(s) for s in steps)


SCHEDULER_CLASSES = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler")


def schedule_from_diffusers(config: dict, source: str) -> dict:
    """GaussianDiffusion's schedule keywords from a diffusers scheduler config (a pipeline's
    `scheduler/scheduler_config.json`): num_train_steps, train_betas ("linear" / "scaled_linear" betas or
    trained_betas), steps_offset, set_alpha_to_one, and timestep_spacing when the config names one. ValueError naming
    `source` for what fastdd cannot follow: another beta schedule, a prediction type other than epsilon, x̂0 clipping
    or thresholding, zero-SNR rescaling, "linspace" spacing (whose DDIM steps to t − T//N, not to the previous
    kept timestep)."""

    def refuse(what: str):
        raise ValueError(f"{source}: fastdd cannot follow {what}")

    if config.get("_class_name") not in SCHEDULER_CLASSES:
        refuse(f"a {config.get('_class_name')!r} scheduler (it follows {', '.join(SCHEDULER_CLASSES)})")
    if config.get("prediction_type", "epsilon") != "epsilon":
        refuse(f"prediction_type {config['prediction_type']!r} (DiT predicts epsilon)")
    for flag in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
        if config.get(flag):
            refuse(f"{flag}: true")
    steps = int(config.get("num_train_timesteps", 1000))
    schedule = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    elif schedule == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    else:
        refuse(f"beta_schedule {schedule!r} (it follows linear, scaled_linear and trained_betas)")
    out = {
        "num_train_steps": steps,
        "train_betas": betas.tolist(),
        "steps_offset": int(config.get("steps_offset", 0)),
        "set_alpha_to_one": bool(config.get("set_alpha_to_one", True)),
    }
    spacing = config.get("timestep_spacing")
    if spacing == "linspace":
        refuse('timestep_spacing "linspace" (its DDIM steps to t − T//N, not to the previous kept timestep)')
    if spacing is not None:
        out["timestep_spacing"] = spacing
    return out


class GaussianDiffusion:
    """Respaced ADM/IDDPM diffusion: float64 tables over respaced indices 0..N-1 and pure step functions.

    num_steps: N sampling steps; num_train_steps: T; beta_schedule: "linear" (IDDPM's, scaled by 1000/T) unless
    train_betas gives the T training betas (a diffusers scheduler config: `schedule_from_diffusers`);
    learn_sigma: the model outputs [eps; v] (2C channels, learned-range variance), else eps only with the
    fixed variance of ADM (sigma_small=False: "fixed large" = [σ̃²_1, β_1, β_2, ...]; True: σ̃²).
    timestep_spacing: "iddpm" (space_timesteps(T, str(N)), the official DiT sampler), "leading" / "trailing"
    (diffusers' DDIMScheduler spacings; "leading" = IDDPM "ddimN" when N divides T), or any IDDPM section
    string such as "10,15,25" (its counts must sum to N); steps_offset shifts "leading" timesteps (diffusers');
    set_alpha_to_one: DDIM's last step ends at ᾱ = 1 (else at the training ᾱ of timestep 0, diffusers'
    `set_alpha_to_one: false`; ancestral DDPM is unaffected).
    Every table of TABLE_NAMES is an attribute: a float64 CPU tensor [N] indexed by respaced index;
    `timesteps` (long [N]) maps respaced index -> original timestep; `train_betas` / `train_alphas_cumprod`
    are the original [T] schedule.
    """

    TABLE_NAMES = (
        "betas",
        "log_betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "alphas_cumprod_next",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "ddim_alphas_cumprod_prev",
        "sqrt_ddim_alphas_cumprod_prev",
        "sqrt_one_minus_ddim_alphas_cumprod_prev",
        "sqrt_alphas_cumprod_next",
        "sqrt_one_minus_alphas_cumprod_next",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "fixed_variance",
        "fixed_log_variance",
        "ddim_sigma",
    )

    def __init__(
        self,
        num_steps: int = 50,
        num_train_steps: int = 1000,
        beta_schedule: str = "linear",
        learn_sigma: bool = True,
        *,
        sigma_small: bool = False,
        timestep_spacing: str = "iddpm",
        clip_denoised: bool = False,
        train_betas: Sequence[float] | None = None,
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
    ):
        if num_train_steps < 2:
            raise ValueError(f"num_train_steps must be >= 2, got {num_train_steps}")
        if not 1 <= num_steps <= num_train_steps:
            raise ValueError(f"num_steps must be in 1..{num_train_steps}, got {num_steps}")
        if beta_schedule != "linear":
            raise ValueError(
                f"beta_schedule: only 'linear' (the ADM/DiT schedule) is implemented, got {beta_schedule!r}"
            )
        if train_betas is None:
            train_betas = linear_betas(num_train_steps)
        else:
            train_betas = np.asarray(train_betas, dtype=np.float64)
            if train_betas.shape != (num_train_steps,) or not ((train_betas > 0) & (train_betas < 1)).all():
                raise ValueError(
                    f"train_betas: expected {num_train_steps} values in (0, 1), got shape {train_betas.shape}"
                )
        if timestep_spacing == "iddpm":
            kept = space_timesteps(num_train_steps, str(num_steps))
        elif timestep_spacing in ("leading", "trailing"):
            kept = diffusers_timesteps(num_train_steps, num_steps, timestep_spacing, steps_offset)
        else:
            kept = space_timesteps(num_train_steps, timestep_spacing)
        if len(kept) != num_steps or kept[-1] >= num_train_steps:
            raise ValueError(
                f"timestep_spacing {timestep_spacing!r} keeps {len(kept)} steps, not num_steps={num_steps}"
            )

        self.num_steps, self.num_train_steps = num_steps, num_train_steps
        self.beta_schedule, self.timestep_spacing = beta_schedule, timestep_spacing
        self.learn_sigma, self.sigma_small, self.clip_denoised = learn_sigma, sigma_small, clip_denoised
        self.steps_offset, self.set_alpha_to_one = steps_offset, set_alpha_to_one
        self.timestep_list: list[int] = kept
        self.timesteps = torch.tensor(kept, dtype=torch.long)
        self.train_betas = torch.from_numpy(train_betas)
        self.train_alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - train_betas))

        train_ac = np.cumprod(1.0 - train_betas)
        betas, last = [], 1.0
        for t in kept:
            betas.append(1.0 - train_ac[t] / last)
            last = train_ac[t]
        final_alpha = 1.0 if set_alpha_to_one else float(train_ac[0])
        tables = self._compute_tables(np.array(betas), final_alpha)
        self._master = {name: torch.from_numpy(value) for name, value in tables.items()}
        self._alpha_bar_list: list[float] = self._master["alphas_cumprod"].tolist()
        self._on_device: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}
        self._timesteps_on_device: dict[torch.device, Tensor] = {}

    def _compute_tables(self, betas: np.ndarray, final_alpha: float) -> dict[str, np.ndarray]:
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        ddim_prev = np.append(final_alpha, ac[:-1])  # where DDIM's step from index 0 ends
        ac_next = np.append(ac[1:], 0.0)
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # log of the posterior variance, with its 0 at index 0 replaced by the value at index 1
        first = posterior_variance[1] if len(posterior_variance) > 1 else betas[0]
        posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
        if self.sigma_small:
            fixed_variance, fixed_log_variance = posterior_variance, posterior_log_variance_clipped
        else:
            fixed_variance = np.append(first, betas[1:])
            fixed_log_variance = np.log(fixed_variance)
        return {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "alphas_cumprod_next": ac_next,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "ddim_alphas_cumprod_prev": ddim_prev,
            "sqrt_ddim_alphas_cumprod_prev": np.sqrt(ddim_prev),
            "sqrt_one_minus_ddim_alphas_cumprod_prev": np.sqrt(1.0 - ddim_prev),
            "sqrt_alphas_cumprod_next": np.sqrt(ac_next),
            "sqrt_one_minus_alphas_cumprod_next": np.sqrt(1.0 - ac_next),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "fixed_variance": fixed_variance,
            "fixed_log_variance": fixed_log_variance,
            # DDIM σ for η = 1: sqrt((1 - ᾱ_prev) / (1 - ᾱ)) · sqrt(1 - ᾱ / ᾱ_prev)
            "ddim_sigma": np.sqrt((1.0 - ddim_prev) / (1.0 - ac)) * np.sqrt(1.0 - ac / ddim_prev),
        }

    # ------------------------------------------------------------------------------------ tables
    def __getattr__(self, name: str) -> Tensor:
        master = self.__dict__.get("_master")
        if master is not None and name in master:
            return master[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def tables(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """All respaced tables (see TABLE_NAMES) on `device` as `dtype`, cached.

        Args:
            device: the device.
            dtype: the dtype.

        Returns:
            {name: [N] table}.
        """
        key = (torch.device(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = {n: t.to(device=key[0], dtype=dtype) for n, t in self._master.items()}
        return self._on_device[key]

    def timesteps_on(self, device: torch.device | str) -> Tensor:
        """`timesteps` on `device`, cached.

        Args:
            device: the device.

        Returns:
            [N] long original timesteps.
        """
        device = torch.device(device)
        if device not in self._timesteps_on_device:
            self._timesteps_on_device[device] = self.timesteps.to(device)
        return self._timesteps_on_device[device]

    def alpha_bar(self, index: int) -> float:
        """ᾱ at a respaced index as a Python float (from the float64 master table; no device work).

        Args:
            index: respaced index in 0..N-1.

        Returns:
            ᾱ_index.

        Raises:
            ValueError: if index is not an int in 0..N-1.
        """
        return self._alpha_bar_list[self._check_index(index)]

    def _check_index(self, index: int, upper: int | None = None) -> int:
        upper = self.num_steps - 1 if upper is None else upper
        if isinstance(index, bool) or not 0 <= index <= upper:
            raise ValueError(f"i must be an int in 0..{upper}, got {index!r}")
        return index

    def _coefficient(self, name: str, i: Index, like: Tensor) -> Tensor:
        """Table `name` at index i, broadcastable to `like` ([B, ...]); float64 if like is, else float32."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        table = self.tables(like.device, dtype)[name]
        if isinstance(i, Tensor):
            if i.dim() > 1 or (i.dim() == 1 and i.shape[0] not in (1, like.shape[0])):
                raise ValueError(
                    f"i: expected an int or a [B] tensor with B = {like.shape[0]}, got shape {list(i.shape)}"
                )
            return table[i.to(like.device)].reshape(-1, *([1] * (like.dim() - 1)))
        return table[self._check_index(i)]

    # ---------------------------------------------------------------------------- step functions
    def q_sample(self, x0: Tensor, i: Index, noise: Tensor) -> Tensor:
        """Forward process: x_i = sqrt(ᾱ_i) · x0 + sqrt(1 - ᾱ_i) · noise.

        Args:
            x0: [B, C, H, W] clean latents.
            i: respaced index: an int or a [B] tensor.
            noise: [B, C, H, W].

        Returns:
            [B, C, H, W] x_i.
        """
        return (
            self._coefficient("sqrt_alphas_cumprod", i, x0) * x0
            + self._coefficient("sqrt_one_minus_alphas_cumprod", i, x0) * noise
        )

    def predict_xstart(self, x_t: Tensor, i: Index, eps: Tensor) -> Tensor:
        """x̂0 = sqrt(1/ᾱ_i) · x_t - sqrt(1/ᾱ_i - 1) · eps.

        Args:
            x_t: [B, C, H, W].
            i: respaced index: an int or a [B] tensor.
            eps: [B, C, H, W] predicted noise.

        Returns:
            [B, C, H, W] x̂0.
        """
        return (
            self._coefficient("sqrt_recip_alphas_cumprod", i, x_t) * x_t
            - self._coefficient("sqrt_recipm1_alphas_cumprod", i, x_t) * eps
        )

    def predict_eps(self, x_t: Tensor, i: Index, pred_xstart: Tensor) -> Tensor:
        """The eps consistent with x̂0: (sqrt(1/ᾱ_i) · x_t - x̂0) / sqrt(1/ᾱ_i - 1).

        Args:
            x_t: [B, C, H, W].
            i: respaced index: an int or a [B] tensor.
            pred_xstart: [B, C, H, W] x̂0.

        Returns:
            [B, C, H, W] eps.
        """
        return (self._coefficient("sqrt_recip_alphas_cumprod", i, x_t) * x_t - pred_xstart) / self._coefficient(
            "sqrt_recipm1_alphas_cumprod", i, x_t
        )

    def split_model_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the model output into eps and the variance values v.

        Args:
            model_output: [B, 2C, H, W] with learn_sigma, else [B, C, H, W].
            x_t: [B, C, H, W] (gives B and C).

        Returns:
            (eps [B, C, H, W], v [B, C, H, W] with learn_sigma, else None).

        Raises:
            ValueError: if model_output's shape does not fit x_t and learn_sigma.
        """
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if (
            model_output.dim() != x_t.dim()
            or model_output.shape[1] != expected
            or model_output.shape[0] != x_t.shape[0]
        ):
            raise ValueError(
                f"model_output: expected [{x_t.shape[0]}, {expected}, ...] for x_t {list(x_t.shape)} "
                f"(learn_sigma={self.learn_sigma}), got {list(model_output.shape)}"
            )
        if self.learn_sigma:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, i: Index, clip_denoised: bool | None = None
    ) -> dict[str, Tensor]:
        """Posterior p(x_{i-1} | x_i) of ADM.

        Args:
            model_output: [B, 2C, H, W] (eps, v) with learn_sigma, else [B, C, H, W].
            x_t: [B, C, H, W].
            i: respaced index: an int or a [B] tensor.
            clip_denoised: clamp x̂0 to [-1, 1] before forming the mean (default: the diffusion's clip_denoised,
                False).

        Returns:
            dict(mean, variance, log_variance, pred_xstart, eps), each [B, C, H, W].

        Raises:
            ValueError: if model_output's shape does not fit x_t and learn_sigma.
        """
        eps, v = self.split_model_output(model_output, x_t)
        if v is None:
            log_variance = self._coefficient("fixed_log_variance", i, x_t).expand_as(x_t)
            variance = self._coefficient("fixed_variance", i, x_t).expand_as(x_t)
        else:
            min_log = self._coefficient("posterior_log_variance_clipped", i, x_t)
            max_log = self._coefficient("log_betas", i, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        pred_xstart = self.predict_xstart(x_t, i, eps)
        if self.clip_denoised if clip_denoised is None else clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = (
            self._coefficient("posterior_mean_coef1", i, x_t) * pred_xstart
            + self._coefficient("posterior_mean_coef2", i, x_t) * x_t
        )
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def posterior_kl_bits(
        self, model_output: Tensor, x0: Tensor, x_t: Tensor, i: Index
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """KL(q(x_{i-1} | x_i, x0) ‖ p(x_{i-1} | x_i)) in bits per dimension, per row.

        ADM's L_t for i > 0.

        Args:
            model_output: [B, 2C, H, W] (freeze its eps part to train only the variance, as ADM does).
            x0: [B, C, H, W] clean latents.
            x_t: [B, C, H, W].
            i: respaced index: an int or a [B] tensor.

        Returns:
            (kl [B], the p_mean_variance dict of model_output).
        """
        out = self.p_mean_variance(model_output, x_t, i)
        true_mean = (
            self._coefficient("posterior_mean_coef1", i, x0) * x0
            + self._coefficient("posterior_mean_coef2", i, x0) * x_t
        )
        true_log_variance = self._coefficient("posterior_log_variance_clipped", i, x0)
        model_mean, model_log_variance = out["mean"], out["log_variance"]
        kl = 0.5 * (
            -1.0
            + model_log_variance
            - true_log_variance
            + torch.exp(true_log_variance - model_log_variance)
            + (true_mean - model_mean) ** 2 * torch.exp(-model_log_variance)
        )
        return kl.flatten(1).mean(1) / math.log(2.0), out

    def ddpm_step(self, out: dict[str, Tensor], noise: Tensor | None, i: Index) -> Tensor:
        """Ancestral sample x_{i-1} = mean + exp(0.5 · log_variance) · noise (no noise at i == 0).

        Args:
            out: a p_mean_variance dict ([B, C, H, W] entries).
            noise: [B, C, H, W] (may be None when i is the int 0).
            i: respaced index: an int or a [B] tensor.

        Returns:
            [B, C, H, W] x_{i-1}.

        Raises:
            ValueError: if noise is None at an int i > 0.
        """
        mean = out["mean"]
        if isinstance(i, Tensor):
            nonzero = (i.to(mean.device) != 0).to(mean.dtype).reshape(-1, *([1] * (mean.dim() - 1)))
            return mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        if self._check_index(i) == 0:
            return mean
        if noise is None:
            raise ValueError(f"noise is required at i={i} > 0")
        return mean + torch.exp(0.5 * out["log_variance"]) * noise

    def _xstart_and_eps(self, eps: Tensor, x_t: Tensor, i: Index) -> tuple[Tensor, Tensor]:
        """x̂0 from eps, clipped (and eps re-derived from it, as IDDPM's DDIM does) when clip_denoised."""
        pred_xstart = self.predict_xstart(x_t, i, eps)
        if self.clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
            eps = self.predict_eps(x_t, i, pred_xstart)
        return pred_xstart, eps

    def ddim_step(self, eps: Tensor, x_t: Tensor, i: Index, eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
        """DDIM update from index i to i-1 (at i == 0 to the final ᾱ: 1, i.e. x̂0, unless set_alpha_to_one is False).

        x_{i-1} = sqrt(ᾱ_prev) · x̂0 + sqrt(1 - ᾱ_prev - σ²) · eps + σ · noise,
        σ = η · sqrt((1 - ᾱ_prev)/(1 - ᾱ)) · sqrt(1 - ᾱ/ᾱ_prev).

        Args:
            eps: [B, C, H, W] predicted noise.
            x_t: [B, C, H, W].
            i: respaced index: an int or a [B] tensor.
            eta: η >= 0.
            noise: [B, C, H, W] (needed when eta > 0).

        Returns:
            [B, C, H, W] x_{i-1}.

        Raises:
            ValueError: if eta < 0, or noise is None with eta > 0.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        pred_xstart, eps = self._xstart_and_eps(eps, x_t, i)
        if eta == 0:
            return (
                self._coefficient("sqrt_ddim_alphas_cumprod_prev", i, x_t) * pred_xstart
                + self._coefficient("sqrt_one_minus_ddim_alphas_cumprod_prev", i, x_t) * eps
            )
        if noise is None:
            raise ValueError("noise is required when eta > 0")
        sigma = eta * self._coefficient("ddim_sigma", i, x_t)
        ac_prev = self._coefficient("ddim_alphas_cumprod_prev", i, x_t)
        direction = torch.sqrt((1 - ac_prev - sigma**2).clamp_min(0))
        return torch.sqrt(ac_prev) * pred_xstart + direction * eps + sigma * noise

    def ddim_inversion_step(self, eps: Tensor, x_t: Tensor, i: Index) -> Tensor:
        """Deterministic DDIM inversion from index i to i+1 (i < N-1).

        x_{i+1} = sqrt(ᾱ_{i+1}) · x̂0 + sqrt(1 - ᾱ_{i+1}) · eps, x̂0 = (x_i - sqrt(1 - ᾱ_i) · eps) / sqrt(ᾱ_i).
        Which eps to pass is the caller's choice: D3HR evaluates the model at the *target* timestep
        timesteps[i+1] on the current latent x_i (`ddim_invert`'s default); IDDPM's ddim_reverse_sample uses
        timesteps[i]. A clean latent is x at index 0 (ᾱ_0 = ᾱ at original step 0, not 1), as in D3HR.

        Args:
            eps: [B, C, H, W] predicted noise.
            x_t: [B, C, H, W] x_i.
            i: respaced index: an int in 0..N-2 or a [B] tensor.

        Returns:
            [B, C, H, W] x_{i+1}.

        Raises:
            ValueError: if an int i is not in 0..N-2.
        """
        if not isinstance(i, Tensor):
            self._check_index(i, self.num_steps - 2)
        pred_xstart, eps = self._xstart_and_eps(eps, x_t, i)
        return (
            self._coefficient("sqrt_alphas_cumprod_next", i, x_t) * pred_xstart
            + self._coefficient("sqrt_one_minus_alphas_cumprod_next", i, x_t) * eps
        )
