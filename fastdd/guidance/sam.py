"""SAM: DiT fine-tuning with self-adaptive memories (Li et al., ICIP 2025), and its Minimax (Gu et al., CVPR
2024) parent. Not a sampling guidance: it produces DiffFit weights that any guidance can then sample.

Per class c, a memory R_c of real latents and a memory G_c of generated predicted-x0 latents ẑ (flattened,
C·H·W = 4096 for DiT-XL/2 at 256 px), capacity 64 each. Per training step, for every class c of the batch whose
G_c is not empty (the authors' order: loss first, then memory update), with Z_c the batch rows of class c:

    L_real,c = λ_r · (1 − min_{b∈Z_c, j} cos(ẑ_b, R_c,j))      (pull towards the least similar real latent)
    L_gen,c  = λ_g · max_{b∈Z_c, j} cos(ẑ_b, G_c,j)            (push away from the most similar generated one)
    L = L_diffusion + Σ_c (L_real,c + L_gen,c) / n_classes_in_batch

λ_r = 0.002, λ_g = 0.008. Memory update: the class's real latents and detached ẑ are appended, then while
over capacity one element is popped: SAM ("most_similar") pops the element with the largest row sum of the
cosine-similarity matrix (self-similarity included, first of equal maxima), recomputed after every pop;
Minimax ("fifo") pops the oldest. Note: fastdd.ops.CosineMemory pops after every appended row; the authors
append all rows of a class first, which can keep a different set, so `LatentMemory` follows the authors
(with the same fastdd.ops kernels for the scores and look-ups). Cosines clamp the norms at 1e-6 (fastdd.ops;
the authors' cosine has no epsilon).

compat=True reproduces a quirk of the SAM code: the memory term is added to the loss inside the loop over
the batch's classes (iterated in Python `set` order) after accumulating, so the k-th class (0-based) of n
enters with weight (n − k)/n instead of 1/n. Minimax's code has the plain sum (compat=False).

L_diffusion is the DiT/ADM training loss: ε-MSE (mean over C, H, W) plus, for learned-sigma models, the
variational bound term in bits/dim with the mean prediction frozen (KL of the true posterior to the model's
at t > 0, the discretized-Gaussian decoder NLL at t = 0), averaged over the batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import ops
from ..data.atomic import save_safetensors_atomic, write_atomic
from ..data.dataset import TensorBatches
from ..data.latents import EncodedBatches
from ..models.dit import DiT
from ..ops._checks import check_positive_int
from ..progress import progress_bar
from ..sampling.diffusion import GaussianDiffusion

LAMBDA_REAL = 0.002
LAMBDA_GEN = 0.008
POLICIES = ("most_similar", "fifo")
DIFFFIT_KEYWORDS = ("bias", "norm", "gamma", "y_embed")


# ------------------------------------------------------------------------------------------------ memories
class LatentMemory:
    """Up to `capacity` rows [dim] of one class, oldest first. add() appends rows, then pops while over capacity
    (policy "most_similar": SAM's rule via fastdd.ops.most_similar_index; "fifo": the oldest row).
    Look-ups go through fastdd.ops.max_cosine (cosine eps 1e-6)."""

    def __init__(
        self, capacity: int, dim: int, policy: str = "most_similar", device=None, dtype: torch.dtype = torch.float32
    ):
        check_positive_int("capacity", capacity)
        check_positive_int("dim", dim)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.capacity, self.dim, self.policy = capacity, dim, policy
        self.buffer = torch.zeros(capacity + 8, dim, device=device, dtype=dtype)  # rows >= count are free
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def view(self) -> Tensor:
        """The stored rows, oldest first.

        Returns:
            [count, dim] view of the buffer.
        """
        return self.buffer[: self.count]

    def add(self, rows: Tensor) -> None:
        """Append rows (in order), then pop while more than `capacity` rows are stored.

        Args:
            rows: [n, dim] (detached, cast to the buffer's dtype).

        Raises:
            ValueError: if rows is not [n, dim].
        """
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows: expected [n, {self.dim}], got {list(rows.shape)}")
        needed = self.count + rows.shape[0]
        if needed > self.buffer.shape[0]:
            grown = self.buffer.new_zeros(needed, self.dim)
            grown[: self.count] = self.buffer[: self.count]
            self.buffer = grown
        self.buffer[self.count : needed] = rows.detach().to(self.buffer.dtype)
        self.count = needed
        while self.count > self.capacity:
            popped = 0 if self.policy == "fifo" else int(ops.most_similar_index(self.buffer, self.count))
            self.buffer[popped : self.count - 1] = self.buffer[popped + 1 : self.count].clone()
            self.count -= 1

    def max_cosine(self, query: Tensor) -> Tensor:
        """max over rows b and stored j of cos(query_b, memory_j).

        Args:
            query: [B, dim].

        Returns:
            0-dim maximum, differentiable w.r.t. query.
        """
        values, _ = ops.max_cosine(query, self.buffer, self.count)
        return values.max()

    def min_cosine(self, query: Tensor) -> Tensor:
        """min over rows b and stored j of cos(query_b, memory_j) = −max cos(−query_b, memory_j).

        Args:
            query: [B, dim].

        Returns:
            0-dim minimum, differentiable w.r.t. query.
        """
        return -self.max_cosine(-query)


class SamMemory:
    """The per-class real and generated memories with SAM's loss terms (see the module docstring).

    num_classes, dim (C·H·W); capacity: per memory (64); policy: "most_similar" (SAM) or "fifo" (Minimax);
    lambda_real / lambda_gen: λ_r, λ_g >= 0; compat: the SAM code's in-loop loss accumulation.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        capacity: int = 64,
        policy: str = "most_similar",
        lambda_real: float = LAMBDA_REAL,
        lambda_gen: float = LAMBDA_GEN,
        *,
        compat: bool = False,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        check_positive_int("num_classes", num_classes)
        if not lambda_real >= 0:
            raise ValueError(f"lambda_real must be >= 0, got {lambda_real}")
        if not lambda_gen >= 0:
            raise ValueError(f"lambda_gen must be >= 0, got {lambda_gen}")
        self.real = [LatentMemory(capacity, dim, policy, device, dtype) for _ in range(num_classes)]
        self.gen = [LatentMemory(capacity, dim, policy, device, dtype) for _ in range(num_classes)]
        self.lambda_real, self.lambda_gen, self.compat = lambda_real, lambda_gen, compat

    def _check_labels(self, labels: Sequence[int]) -> list[int]:
        labels = [int(c) for c in labels]
        if not labels or min(labels) < 0 or max(labels) >= len(self.real):
            raise ValueError(f"labels must be a non-empty list of classes in 0..{len(self.real) - 1}, got {labels}")
        return labels

    def loss(self, z_hat: Tensor, labels: Sequence[int]) -> Tensor:
        """SAM's memory loss Σ_c weight_c · (L_real,c + L_gen,c).

        Summed over the classes of the batch whose generated memory is not empty.

        weight_c = 1/n over the n classes of the batch ((n − k)/n for the k-th class with compat=True).

        Args:
            z_hat: [B, dim] predicted x0 (differentiable).
            labels: the B classes as host ints.

        Returns:
            0-dim loss.

        Raises:
            ValueError: if labels is empty or has a class outside 0..num_classes - 1.
        """
        labels = self._check_labels(labels)
        classes = list(set(labels))  # the authors' iteration order (matters for compat only)
        total = z_hat.new_zeros(())
        for k, c in enumerate(classes):
            if len(self.gen[c]) == 0:
                continue
            rows = [b for b, label in enumerate(labels) if label == c]
            query = z_hat[rows]
            real_term = self.lambda_real * (1 - self.real[c].min_cosine(query))
            term = real_term + self.lambda_gen * self.gen[c].max_cosine(query)
            weight = (len(classes) - k) if self.compat else 1
            total = total + term * (weight / len(classes))
        return total

    def update(self, real: Tensor, z_hat: Tensor, labels: Sequence[int]) -> None:
        """Append each class's real and generated (detached) latents to its memories, then pop.

        Args:
            real: [B, dim] real latents.
            z_hat: [B, dim] predicted x0.
            labels: the B classes as host ints.

        Raises:
            ValueError: if labels is empty or has a class outside 0..num_classes - 1.
        """
        labels = self._check_labels(labels)
        for c in dict.fromkeys(labels):
            rows = [b for b, label in enumerate(labels) if label == c]
            self.real[c].add(real[rows])
            self.gen[c].add(z_hat[rows].detach())


# ------------------------------------------------------------------------------------------- DiffFit params
def difffit_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The DiffFit subset the authors train, in named_parameters order.

    Parameters whose name contains "bias", "norm", "gamma" or "y_embed" (biases, norm affines, DiffFit gammas,
    the class embedding table).

    Args:
        model: the network.

    Returns:
        {name: parameter}.
    """
    return {name: p for name, p in model.named_parameters() if any(key in name for key in DIFFFIT_KEYWORDS)}


def to_difffit(model: DiT) -> DiT:
    """A copy of `model` with DiffFit gammas where Minimax's DiT has them: its first 14 blocks (all blocks of a DiT
    of depth <= 14).

    The gammas are all ones: identical outputs.

    Args:
        model: a fastdd DiT without DiffFit gammas.

    Returns:
        The new DiT, on the model's device and dtype, in its training mode.

    Raises:
        ValueError: if the model already has DiffFit gammas.
    """
    if model.diffit:
        raise ValueError("model: already has DiffFit gammas")
    parameter = next(model.parameters())
    copy = type(model)(**{**model.config(), "diffit": True}).to(device=parameter.device, dtype=parameter.dtype)
    copy.load_state_dict(model.state_dict(), strict=False)
    return copy.train(model.training)


# ---------------------------------------------------------------------------------------- diffusion loss
def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """ADM's tanh approximation of Φ(x)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) of data discretized to 256 bins under N(mean, e^{2·log_scale}), elementwise.

    Data in [−1, 1], bin half-width 1/255; the edge bins x < −0.999 / x > 0.999 take the whole tail (ADM's
    decoder term).

    Args:
        x: data, e.g. [B, C, H, W].
        mean: broadcastable to x.
        log_scale: log standard deviation, broadcastable to x.

    Returns:
        The log-likelihood of each element, in the broadcast shape.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def variational_bound_terms(
    diffusion: GaussianDiffusion, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor
) -> Tensor:
    """ADM's L_t in bits/dim per row.

    KL(q(x_{t−1}|x_t, x0) ‖ p(x_{t−1}|x_t)) for t > 0, the decoder NLL at t = 0.

    Args:
        diffusion: the diffusion.
        model_output: [B, 2C, H, W] (ε frozen by the caller).
        x0: [B, C, H, W] clean latents.
        x_t: [B, C, H, W] noised latents.
        t: [B] indices.

    Returns:
        [B] L_t.
    """
    kl, out = diffusion.posterior_kl_bits(model_output, x0, x_t, t)
    log_likelihood = discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    nll = -log_likelihood.mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def diffusion_training_loss(
    model: nn.Module, diffusion: GaussianDiffusion, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    """DiT training loss per row and the predicted x̂0 (differentiable).

    Args:
        model: the DiT.
        diffusion: the unrespaced diffusion.
        x0: [B, C, H, W] clean latents.
        t: [B] indices of the unrespaced diffusion.
        noise: [B, C, H, W].
        y: [B] model labels.

    Returns:
        (loss [B], pred_xstart [B, C, H, W]).
    """
    x_t = diffusion.q_sample(x0, t, noise)
    model_output = model(x_t, diffusion.timesteps_on(x0.device)[t], y)
    eps, variance_values = diffusion.split_model_output(model_output, x_t)
    loss = (noise - eps).pow(2).mean(dim=(1, 2, 3))
    if variance_values is not None:
        frozen = torch.cat([eps.detach(), variance_values], dim=1)
        loss = loss + variational_bound_terms(diffusion, frozen, x0, x_t, t)
    return loss, diffusion.predict_xstart(x_t, t, eps)


# ------------------------------------------------------------------------------------------- fine-tuning
@dataclass
class SamFinetune:
    """What `finetune_sam` returns: the trained model, the EMA of its DiffFit parameters (what the authors
    sample from), and the memories at the end."""

    model: DiT
    ema: dict[str, Tensor]
    memory: SamMemory
    losses: list[float] = field(default_factory=list)  # total loss per step

    def ema_model(self) -> DiT:
        """A copy of the model with the EMA weights.

        Returns:
            The DiT, on the model's device and dtype, in eval mode.
        """
        state = {**self.model.state_dict(), **self.ema}
        copy = type(self.model)(**self.model.config())
        parameter = next(self.model.parameters())
        copy.load_state_dict(state)
        return copy.to(device=parameter.device, dtype=parameter.dtype).eval()


def finetune_sam(
    model: DiT,
    diffusion: GaussianDiffusion,
    latents: Tensor | EncodedBatches,
    labels: Tensor | None = None,
    *,
    epochs: int = 8,
    batch_size: int = 8,
    lr: float = 1e-3,
    lambda_real: float = LAMBDA_REAL,
    lambda_gen: float = LAMBDA_GEN,
    capacity: int = 64,
    policy: str = "most_similar",
    class_dropout_prob: float | None = None,
    ema_decay: float = 0.9999,
    compat: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> SamFinetune:
    """Fine-tune the DiffFit parameters of `model` in place (diffusion loss + SAM's memory terms).

    AdamW(lr, weight decay 0) over `difffit_parameters`; every other parameter is frozen (requires_grad flags
    are restored afterwards). Label dropout to the null class is drawn here so the model stays in eval mode.
    EMA of the DiffFit parameters with ema_decay after each step.

    Randomness, from torch.Generator().manual_seed(seed) on the CPU, in this order: per epoch a permutation
    of the N latents (batches of batch_size read in that order, the last partial batch dropped, as the authors'
    drop_last);
    per step t = randint(0, T, [B]), noise = randn([B, C, H, W]), dropout = rand([B]) < p.
    Differences from the authors' script: fixed latents (they draw a new VAE posterior sample of a randomly
    flipped image each time), one process.

    Args:
        model: a fastdd DiT with DiffFit gammas (`to_difffit` adds them).
        diffusion: the unrespaced training diffusion (GaussianDiffusion(1000), learn_sigma as the model).
        latents: [N, C, H, W] real latents (VAE latents × 0.18215), C, H, W the model's; or a batch source
            (`fastdd.data.latents.EncodedBatches`: the real images read and encoded batch by batch, so that no more
            than one batch is held), whose `labels` are the classes.
        labels: [N] classes (with a tensor of latents).
        epochs: number of epochs.
        batch_size: batch size (<= N).
        lr: AdamW learning rate.
        lambda_real: λ_r.
        lambda_gen: λ_g.
        capacity: capacity of each memory.
        policy: "most_similar" (SAM) or "fifo" (Minimax).
        class_dropout_prob: label dropout probability p (default: the model's, 0.1 for DiT).
        ema_decay: EMA decay in [0, 1].
        compat: the SAM code's in-loop loss accumulation.
        seed: seed of the CPU generator.
        progress: show a progress bar.

    Returns:
        SamFinetune: the model, the EMA of its DiffFit parameters, the memories and the loss per step.

    Raises:
        ValueError: if model is not a fastdd DiT with DiffFit gammas, diffusion is respaced or its learn_sigma
            differs from the model's, latents or labels do not fit the model, epochs or batch_size is not a
            positive int, batch_size > N, lr <= 0, ema_decay or class_dropout_prob is out of range, or dropout
            is asked of a model without a null-class embedding.
    """
    if not isinstance(model, DiT):
        raise ValueError(f"model: expected a fastdd DiT, got {type(model).__name__}")
    if not model.diffit:
        raise ValueError("model: has no DiffFit gammas; fine-tune to_difffit(model)")
    if diffusion.num_steps != diffusion.num_train_steps:
        raise ValueError(
            f"diffusion: needs the unrespaced {diffusion.num_train_steps}-step diffusion, got {diffusion.num_steps} steps"
        )
    if diffusion.learn_sigma != model.learn_sigma:
        raise ValueError(f"diffusion: learn_sigma={diffusion.learn_sigma}, the model's is {model.learn_sigma}")
    shape = (model.in_channels, model.input_size, model.input_size)
    if isinstance(latents, Tensor):
        if latents.dim() != 4 or tuple(latents.shape[1:]) != shape or latents.shape[0] == 0:
            expected = f"a non-empty [N, {shape[0]}, {shape[1]}, {shape[2]}]"
            raise ValueError(f"latents: expected {expected}, got {list(latents.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        if labels.shape != (latents.shape[0],):
            raise ValueError(f"labels: expected shape [{latents.shape[0]}], got {list(labels.shape)}")
        source = TensorBatches(latents, labels)
    else:
        source, labels = latents, latents.labels
    if int(labels.min()) < 0 or int(labels.max()) >= model.num_classes:
        raise ValueError(f"labels must be in 0..{model.num_classes - 1}")
    for name, value in dict(epochs=epochs, batch_size=batch_size).items():
        check_positive_int(name, value)
    if batch_size > len(labels):
        raise ValueError(f"batch_size {batch_size} is larger than the {len(labels)} latents (no full batch)")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= ema_decay <= 1:
        raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
    dropout = model.class_dropout_prob if class_dropout_prob is None else class_dropout_prob
    if not 0 <= dropout < 1:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {dropout}")
    if dropout > 0 and model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
        raise ValueError("class_dropout_prob: the model has no null-class embedding (class_dropout_prob=0 at build)")

    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    memory = SamMemory(
        model.num_classes,
        math.prod(shape),
        capacity,
        policy,
        lambda_real,
        lambda_gen,
        compat=compat,
        device=device,
        dtype=torch.promote_types(dtype, torch.float32),
    )
    trained = difffit_parameters(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    optimizer = torch.optim.AdamW(list(trained.values()), lr=lr, weight_decay=0.0)
    ema = {name: p.detach().clone() for name, p in trained.items()}
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(labels) // batch_size
    result = SamFinetune(model, ema, memory)
    was_training = model.training
    model.eval()  # no built-in label dropout: it is drawn from `generator` below
    try:
        with progress_bar(total=epochs * steps_per_epoch, disable=not progress, desc="sam fine-tuning") as bar:
            for _ in range(epochs):
                order = torch.randperm(len(labels), generator=generator)
                for x0, batch_labels in source.batches(order[: steps_per_epoch * batch_size], batch_size):
                    if tuple(x0.shape[1:]) != shape:
                        raise ValueError(
                            f"latents: expected [B, {shape[0]}, {shape[1]}, {shape[2]}], got {list(x0.shape)}"
                        )
                    t = torch.randint(0, diffusion.num_steps, (batch_size,), generator=generator)
                    noise = torch.randn((batch_size, *shape), generator=generator)
                    dropped = torch.rand(batch_size, generator=generator) < dropout
                    model_labels = torch.where(dropped, torch.full_like(batch_labels, model.num_classes), batch_labels)
                    x0 = x0.to(device=device, dtype=dtype)
                    loss, pred_xstart = diffusion_training_loss(
                        model,
                        diffusion,
                        x0,
                        t.to(device),
                        noise.to(device=device, dtype=dtype),
                        model_labels.to(device),
                    )
                    host_labels = batch_labels.tolist()
                    z_hat = pred_xstart.flatten(1)
                    total = loss.mean() + memory.loss(z_hat, host_labels)
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()  # before the update: the look-ups saved the memory buffers for backward
                    memory.update(x0.flatten(1), z_hat.detach(), host_labels)
                    optimizer.step()
                    with torch.no_grad():
                        for name, p in trained.items():
                            ema[name].mul_(ema_decay).add_(p.detach(), alpha=1 - ema_decay)
                    result.losses.append(float(total.detach()))
                    bar.set_postfix(loss=f"{result.losses[-1]:.4f}", refresh=False)
                    bar.update()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return result


def save_finetuned(path: str | os.PathLike, model: DiT, ema: dict[str, Tensor] | None = None) -> None:
    """Write Minimax/SAM-style weights, atomically (fastdd.data.atomic).

    Loadable by `DiT.from_checkpoint` / `load_dit_checkpoint` (which picks "ema" when present, as the authors'
    sampler does).

    Args:
        path: ".safetensors": one flat state dict (the EMA weights if given, else the model's); otherwise
            torch.save of {"model": state, "ema": state with the EMA DiffFit parameters} (or the plain state
            dict without ema).
        model: the DiT.
        ema: EMA parameters by name (as `finetune_sam` returns), or None.

    Raises:
        ValueError: if ema has keys not in the model, or path's folder does not exist.
    """
    path = os.fspath(path)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if ema is not None:
        unknown = sorted(set(ema) - set(state))
        if unknown:
            raise ValueError(f"ema: keys not in the model: {unknown[:4]}")
        ema_state = {**state, **{key: value.detach().cpu().contiguous() for key, value in ema.items()}}
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path: folder does not exist: {folder}")
    if path.endswith(".safetensors"):
        save_safetensors_atomic(ema_state if ema is not None else state, path)
    else:
        checkpoint = {"model": state, "ema": ema_state} if ema is not None else state
        write_atomic(path, lambda temporary: torch.save(checkpoint, temporary))
