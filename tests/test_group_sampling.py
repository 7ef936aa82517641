"""D3HR group sampling (fastdd.ops.group_sampling) on every backend available here.

The reference (fastdd.ops.reference.group_score / group_sampling) is checked against a hand computation;
the C++ backend against the reference (same draws, so the same group); the Triton backend, which draws its
candidates in-kernel with Philox, by materialising those candidates and scoring them with the reference.
Triton runs in its CPU interpreter here and is compiled ahead of time for sm_80 / sm_90 in a subprocess.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastdd import ops  # noqa: E402
from fastdd.ops import reference  # noqa: E402
from fastdd.ops._backend import backend_usable, compiled_kernel  # noqa: E402
from fastdd.ops.group_sampling import group_score, philox_candidates  # noqa: E402

CPU = torch.device("cpu")
HAS_CPP = compiled_kernel("group_sampling", "CPU") and compiled_kernel("group_score", "CPU")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="fastdd._C lacks the group-sampling ops; run setup.py build_ext")
needs_triton = pytest.mark.skipif(
    not backend_usable("triton", CPU, "group_sampling"), reason="triton is not importable or TRITON_INTERPRET!=1"
)
WEIGHTS = (1.0, 1.0, 0.1)


def _distribution(dim, seed=0, dtype=torch.float32):
    """A class Gaussian with an offset and uneven spreads (mean [D], std [D])."""
    g = torch.Generator().manual_seed(seed)
    mean = 0.5 + torch.randn(dim, generator=g, dtype=torch.float64)
    std = 0.3 + torch.rand(dim, generator=g, dtype=torch.float64)
    return mean.to(dtype), std.to(dtype)


def _hand_score(group, mean, std, weights):
    """The D3HR score of one group [ipc, D] with Python floats and explicit loops."""
    ipc, dim = len(group), len(mean)
    rows = [[float(v) for v in row] for row in group]
    mean_gap = std_gap = 0.0
    for d in range(dim):
        column = [rows[i][d] for i in range(ipc)]
        m = sum(column) / ipc
        mean_gap += (m - float(mean[d])) ** 2
        if ipc > 1:
            s = math.sqrt(sum((v - m) ** 2 for v in column) / (ipc - 1))
            std_gap += (s - float(std[d])) ** 2
    skew_squares = 0.0
    if ipc > 1:  # the authors' skewness_batch: z per feature over the members, Σ over features, n = D
        member_skews = [0.0] * ipc
        for d in range(dim):
            column = [rows[i][d] for i in range(ipc)]
            m = sum(column) / ipc
            s = math.sqrt(sum((v - m) ** 2 for v in column) / (ipc - 1))
            for i in range(ipc):
                member_skews[i] += ((column[i] - m) / s) ** 3
        skew_squares = sum((v * dim / ((dim - 1) * (dim - 2))) ** 2 for v in member_skews)
    score = weights[0] * math.sqrt(mean_gap)
    if ipc > 1:
        score += weights[1] * math.sqrt(std_gap) + weights[2] * math.sqrt(skew_squares)
    return score


# --------------------------------------------------------------------------- reference properties
@pytest.mark.parametrize("ipc", [1, 2, 4])
def test_reference_score_equals_hand_computation(ipc):
    mean, std = _distribution(7, dtype=torch.float64)
    g = torch.Generator().manual_seed(ipc)
    groups = torch.randn(3, ipc, 7, generator=g, dtype=torch.float64) * std * 1.5 + mean + 0.2
    weights = (0.7, 1.3, 0.4)
    scores = reference.group_score(groups, mean, std, weights)
    hand = [_hand_score(group.tolist(), mean.tolist(), std.tolist(), weights) for group in groups]
    expected = torch.tensor(hand, dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)


def test_reference_skewness_standardises_each_feature_over_the_members():
    """group_skewness = the authors' skewness_batch: feature d of member i is z = (x − mean_d) / std_d with the
    members' mean and unbiased std of feature d; member i's skew is Σ_d z³ · D / ((D − 1)(D − 2))."""
    # D = 3 features, 3 members; feature 0: [0, 0, 3] (mean 1, std √3), 1: [1, 2, 3] (symmetric), 2: [5, 5, 2]
    group = torch.tensor([[[0.0, 1.0, 5.0], [0.0, 2.0, 5.0], [3.0, 3.0, 2.0]]], dtype=torch.float64)
    z0 = torch.tensor([-1.0, -1.0, 2.0]) / math.sqrt(3.0)
    z2 = -z0
    expected = (z0**3 + torch.tensor([-1.0, 0.0, 1.0]) ** 3 + z2**3) * 3 / (2 * 1)
    torch.testing.assert_close(reference.group_skewness(group)[0], expected.double(), rtol=1e-12, atol=1e-12)
    # the authors' restated (their lines 171-175 on [G, ipc, D]) on random groups
    groups = torch.randn(4, 5, 33, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    centred = (groups - torch.mean(groups, dim=1, keepdim=True)) / torch.std(groups, dim=1, keepdim=True)
    authors = torch.sum(centred**3, dim=2) * (33 / ((33 - 1) * (33 - 2)))
    torch.testing.assert_close(reference.group_skewness(groups), authors, rtol=1e-12, atol=1e-12)


def test_reference_lower_score_is_the_more_representative_group():
    mean, std = _distribution(64, seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 8, 64, generator=g, dtype=torch.float64)
    faithful = noise * std + mean
    shifted = faithful + 0.5 * std  # wrong mean
    squeezed = noise * std * 0.3 + mean  # too little spread
    skewed = (noise.abs() ** 1.5) * std + mean  # right-skewed members
    scores = reference.group_score(torch.cat([faithful, shifted, squeezed, skewed]), mean, std)
    assert scores[0] < scores[1:].min()


def test_reference_sampling_keeps_the_lowest_of_its_candidates_and_is_reproducible():
    mean, std = _distribution(40, seed=3)
    group, score = reference.group_sampling(mean, std, 3, 50, generator=torch.Generator().manual_seed(4), chunk=16)
    # redraw the candidates the way the reference does (chunks of 16 from the same generator)
    g = torch.Generator().manual_seed(4)
    candidates = torch.cat([torch.randn(n, 3, 40, generator=g) * std + mean for n in (16, 16, 16, 2)])
    scores = reference.group_score(candidates, mean, std)
    assert torch.equal(group, candidates[scores.argmin()])
    assert score.item() == scores.min().item()
    assert group.untyped_storage().nbytes() == group.numel() * group.element_size()  # not a view of a chunk
    again, again_score = reference.group_sampling(
        mean, std, 3, 50, generator=torch.Generator().manual_seed(4), chunk=16
    )
    assert torch.equal(again, group) and again_score.item() == score.item()
    other, _ = reference.group_sampling(mean, std, 3, 50, generator=torch.Generator().manual_seed(5), chunk=16)
    assert not torch.equal(other, group)
    # more candidates never give a worse group (the first 50 are the same draws)
    _, more_score = reference.group_sampling(mean, std, 3, 200, generator=torch.Generator().manual_seed(4), chunk=16)
    assert more_score.item() <= score.item()


def test_ipc_one_leaves_the_std_and_skew_terms_out():
    mean, std = _distribution(30, seed=6)
    groups = torch.randn(5, 1, 30) * std + mean
    mean_only = (groups[:, 0] - mean).norm(dim=-1)
    torch.testing.assert_close(reference.group_score(groups, mean, std, (1.0, 5.0, 0.1)), mean_only)
    for backend in ("cpp",) if HAS_CPP else ():
        torch.testing.assert_close(group_score(groups, mean, std, (1.0, 5.0, 0.1), backend=backend), mean_only)


# --------------------------------------------------------------------------- C++ backend
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(6, 1, 3), (9, 2, 64), (5, 10, 300), (3, 7, 1029)], ids=str)
def test_cpp_group_score_matches_reference(dtype, shape):
    n_groups, ipc, dim = shape
    mean, std = _distribution(dim, seed=7)
    groups = (torch.randn(n_groups, ipc, dim, generator=torch.Generator().manual_seed(8)) * std + mean).to(dtype)
    scores = group_score(groups, mean.to(dtype), std.to(dtype), backend="cpp")
    assert scores.dtype == dtype and scores.shape == (n_groups,)
    # the reference in float64 on the same (rounded) values; the C++ kernel accumulates in float64
    expected = reference.group_score(groups.double(), mean.to(dtype).double(), std.to(dtype).double())
    if dtype == torch.bfloat16:  # rounded draws can make a feature equal on both members of a pair: NaN skewness
        torch.testing.assert_close(scores.double(), expected, rtol=8e-3, atol=0, equal_nan=True)
    else:
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(scores.double(), expected, rtol=tol, atol=tol)


@needs_cpp
@pytest.mark.parametrize("config", [(4, 2500, 1024, 64), (1, 40, 16, 3), (10, 300, 128, 200), (3, 33, 8, 17)], ids=str)
def test_cpp_sampling_picks_the_reference_group(config):
    ipc, n_candidates, chunk, dim = config
    mean, std = _distribution(dim, seed=9)
    kwargs = dict(weights=(1.0, 0.5, 0.2), chunk=chunk)
    group, score = ops.group_sampling(
        mean, std, ipc, n_candidates, generator=torch.Generator().manual_seed(10), backend="cpp", **kwargs
    )
    ref_group, ref_score = reference.group_sampling(
        mean, std, ipc, n_candidates, generator=torch.Generator().manual_seed(10), **kwargs
    )
    assert torch.equal(group, ref_group)
    torch.testing.assert_close(score, ref_score, rtol=2e-6, atol=0)
    # seed= is a shorthand for a freshly seeded generator; "auto" on CPU is cpp
    by_seed, _ = ops.group_sampling(mean, std, ipc, n_candidates, seed=10, **kwargs)
    assert torch.equal(by_seed, ref_group)


# --------------------------------------------------------------------------- Triton backend (interpreted)
@needs_triton
@pytest.mark.parametrize("config", [(64, 1, 8), (300, 5, 16), (129, 3, 12), (3, 2, 5), (70, 17, 4)], ids=str)
def test_triton_scores_its_philox_candidates_like_the_reference(config):
    dim, ipc, n_candidates = config
    mean, std = _distribution(dim, seed=11)
    weights = (1.0, 0.8, 0.3)
    groups, fused = philox_candidates(mean, std, ipc, n_candidates, seed=1234, weights=weights)
    assert groups.shape == (n_candidates, ipc, dim) and fused.shape == (n_candidates,)
    expected = reference.group_score(groups, mean, std, weights)
    torch.testing.assert_close(fused, expected, rtol=2e-6, atol=2e-6)
    group, score = ops.group_sampling(mean, std, ipc, n_candidates, seed=1234, weights=weights, backend="triton")
    best = expected.argmin()
    assert torch.equal(group, groups[best])  # regenerated bit for bit from the same stream
    torch.testing.assert_close(score, expected[best], rtol=2e-6, atol=2e-6)


@needs_triton
def test_triton_seed_from_generator_and_tensor_seed():
    mean, std = _distribution(50, seed=12)
    first, _ = ops.group_sampling(mean, std, 2, 6, generator=torch.Generator().manual_seed(13), backend="triton")
    again, _ = ops.group_sampling(mean, std, 2, 6, generator=torch.Generator().manual_seed(13), backend="triton")
    other, _ = ops.group_sampling(mean, std, 2, 6, generator=torch.Generator().manual_seed(14), backend="triton")
    assert torch.equal(first, again) and not torch.equal(first, other)
    # the generator gives exactly one 64-bit seed per call
    drawn = torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(13), dtype=torch.int64)
    by_seed, _ = ops.group_sampling(mean, std, 2, 6, seed=drawn, backend="triton")
    assert torch.equal(by_seed, first)
    big_seed, _ = ops.group_sampling(mean, std, 2, 6, seed=2**63 - 5, backend="triton")
    assert torch.isfinite(big_seed).all()
    # half-precision inputs: drawn and scored in float32, returned in the input dtype
    half, half_score = ops.group_sampling(mean.bfloat16(), std.bfloat16(), 2, 6, seed=drawn, backend="triton")
    groups, scores = philox_candidates(mean.bfloat16().float(), std.bfloat16().float(), 2, 6, seed=drawn)
    assert half.dtype == half_score.dtype == torch.bfloat16
    assert torch.equal(half, groups[scores.argmin()].bfloat16()) and half_score == scores.min().bfloat16()


@needs_triton
def test_philox_candidates_follow_the_requested_gaussian():
    dim, ipc, n_candidates = 128, 4, 64
    mean, std = _distribution(dim, seed=15)
    groups, _ = philox_candidates(mean, std, ipc, n_candidates, seed=99)
    z = ((groups - mean) / std).reshape(-1, dim).double()  # [ipc · n_candidates, D] standard normals
    count = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(count)
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / count)
    assert abs((z**3).mean().item()) < 4 * math.sqrt(15 / count)  # skewness 0
    assert abs((z**4).mean().item() - 3) < 4 * math.sqrt(96 / count)  # kurtosis 3
    # per-feature mean and std close to (mean, std): 256 draws per feature
    samples = z.shape[0]
    assert (z.mean(0).abs() < 5 / math.sqrt(samples)).all()
    assert ((z.std(0) - 1).abs() < 5 / math.sqrt(2 * samples)).all()
    # no repeated streams: members and candidates are uncorrelated
    correlation = torch.corrcoef(z)
    off_diagonal = correlation - torch.eye(samples, dtype=correlation.dtype)
    assert off_diagonal.abs().max() < 6 / math.sqrt(dim)
    assert abs(z[:, 1:].flatten() @ z[:, :-1].flatten()) / count < 4 / math.sqrt(count)  # neighbouring features


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from fastdd.ops.triton.group_sampling import _cos_sin_two_pi

    @triton.jit
    def cos_sin_kernel(u_ptr, cos_ptr, sin_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        cos, sin = _cos_sin_two_pi(tl.load(u_ptr + offsets))
        tl.store(cos_ptr + offsets, cos)
        tl.store(sin_ptr + offsets, sin)


@needs_triton
def test_box_muller_sin_cos_polynomial():
    u = torch.cat([torch.linspace(0, 1 - 2**-24, 1021), torch.tensor([0.125, 0.375, 0.625])])  # quadrant edges
    cos, sin = torch.empty_like(u), torch.empty_like(u)
    cos_sin_kernel[(1,)](u, cos, sin, BLOCK=1024)
    angle = 2 * math.pi * u.double()
    torch.testing.assert_close(cos.double(), torch.cos(angle), rtol=0, atol=3e-7)
    torch.testing.assert_close(sin.double(), torch.sin(angle), rtol=0, atol=3e-7)


# --------------------------------------------------------------------------- validation and compile
def test_bad_inputs_name_the_argument():
    mean, std = _distribution(8)
    cases = [
        (dict(mean=mean[:7]), "std"),
        (dict(mean=mean[None]), "mean"),
        (dict(std=-std), "std"),
        (dict(std=torch.where(torch.arange(8) == 3, float("nan"), std)), "std"),
        (dict(mean=mean.int()), "mean"),
        (dict(std=std.double()), "std"),
        (dict(mean=mean[:2], std=std[:2]), "mean"),
        (dict(ipc=0), "ipc"),
        (dict(ipc=2.0), "ipc"),
        (dict(n_candidates=0), "n_candidates"),
        (dict(weights=(1.0, 1.0)), "weights"),
        (dict(weights=(1.0, -1.0, 0.1)), "weights"),
        (dict(weights=(1.0, float("nan"), 0.1)), "weights"),
        (dict(chunk=0), "chunk"),
        (dict(seed=-1), "seed"),
        (dict(seed=3, generator=torch.Generator()), "seed"),
        (dict(generator="seed"), "generator"),
        (dict(backend="fast"), "backend"),
        (dict(backend="cuda"), "backend"),
    ]
    for change, name in cases:
        kwargs = dict(mean=mean, std=std, ipc=2, n_candidates=4, backend="reference") | change
        with pytest.raises(ValueError, match=name):
            args = [kwargs.pop(key) for key in ("mean", "std", "ipc", "n_candidates")]
            ops.group_sampling(*args, **kwargs)
    with pytest.raises(ValueError, match="groups"):
        group_score(torch.randn(2, 8), mean, std)
    with pytest.raises(ValueError, match="features"):
        group_score(torch.randn(2, 3, 9), mean, std)


@needs_triton
def test_triton_ipc_limit():
    mean, std = _distribution(8)
    with pytest.raises(ValueError, match="ipc"):
        ops.group_sampling(mean, std, 65, 2, backend="triton")


def test_custom_ops_have_working_fake_kernels_and_compile_fullgraph(monkeypatch):
    from fastdd.ops._backend import OP_BACKENDS, forced_backend
    from fastdd.ops.group_sampling import _group_sampling_op, _group_score_op

    checks = ("test_schema", "test_faketensor")
    mean, std = _distribution(16, seed=16)
    groups = torch.randn(4, 3, 16) * std + mean
    backends = ("reference", "cpp") if HAS_CPP else ("reference",)
    for backend in backends:
        with forced_backend("group_score", backend):
            torch.library.opcheck(_group_score_op, (groups, mean, std, 1.0, 1.0, 0.1), test_utils=checks)
        with forced_backend("group_sampling", backend):
            args = (mean, std, torch.Generator().manual_seed(3), None, 3, 5, 1.0, 1.0, 0.1, 2)
            torch.library.opcheck(_group_sampling_op, args, test_utils=checks)
    compiled_score = torch.compile(lambda g, m, s: group_score(g, m, s), fullgraph=True)
    torch.testing.assert_close(compiled_score(groups, mean, std), reference.group_score(groups, mean, std))
    if backend_usable("triton", CPU, "group_sampling"):
        seed = torch.tensor(21)
        with forced_backend("group_sampling", "triton"):
            args = (mean, std, None, seed, 3, 5, 1.0, 1.0, 0.1, 1024)
            torch.library.opcheck(_group_sampling_op, args, test_utils=checks)
        eager_group, eager_score = ops.group_sampling(mean, std, 3, 5, seed=seed, backend="triton")
        # torch.compile traces the dispatcher's choice: make triton auto's choice on CPU through the registry
        monkeypatch.setitem(OP_BACKENDS, "group_sampling", {"cpu": ("triton",), "cuda": ("triton",)})
        sample = lambda m, s, sd: ops.group_sampling(m, s, 3, 5, seed=sd)  # noqa: E731
        group, score = torch.compile(sample, fullgraph=True)(mean, std, seed)
        assert torch.equal(group, eager_group) and torch.equal(score, eager_score)


def test_triton_kernels_compile_for_sm80_and_sm90_without_spills():
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import warnings
        warnings.filterwarnings("ignore")
        from triton_aot import ARCHS, assert_fits, compile_for_gpu
        from fastdd.ops.triton import group_sampling as K

        signature = {"mean_ptr": "*fp32", "std_ptr": "*fp32", "seed_ptr": "*i64", "index_ptr": "*i64",
                     "scores_ptr": "*fp32", "groups_ptr": "*fp32", "dim": "i32", "w_mean": "fp32", "w_std": "fp32",
                     "w_skew": "fp32"}
        modes = {"score": dict(INDEXED=False, SCORE=True, MATERIALISE=False),
                 "materialise": dict(INDEXED=True, SCORE=False, MATERIALISE=True)}
        # one member, the D3HR IPC 10, 8 warps from 17 on, the largest group the kernel takes
        configs = [(1, "score"), (10, "score"), (10, "materialise"), (17, "score"), (K.MAX_IPC, "score"),
                   (K.MAX_IPC, "materialise")]
        for arch in ARCHS:
            for ipc, mode in configs:
                block_i, block_q = K.block_sizes(ipc)
                constexprs = {"IPC": ipc, "BLOCK_I": block_i, "BLOCK_Q": block_q, **modes[mode]}
                kernel = K.group_candidates_kernel
                res = compile_for_gpu(kernel, signature, constexprs, arch, num_warps=K.num_warps(ipc))
                assert_fits(res)
                print(ipc, mode, res)
        """
    )
    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("KernelResources") == 2 * 6
