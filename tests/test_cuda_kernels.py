"""CUDA kernel adapters (flash, cuDNN, efficient) inside the ring schedule, against fp64 SDPA, on one GPU.

The ring code is the same on every device; what differs on CUDA is the kernel adapter (argument order,
the log-sum-exp layout each backend returns, its backward's signature). These tests run the real ring
schedule of ``cp`` ranks inside one process (``simulate_context_parallel_attention``, ranks as threads)
with each CUDA backend and compare forward output and all three gradients with fp64 SDPA on the full
sequence. Without a GPU they are skipped (CI has none); ``scripts/check_cuda.sh`` runs them on a GPU.

Tolerance: the rule of the CPU tests (tests/test_ring_attention.py): CP's max abs error must stay within
2x the error of one monolithic call of the same backend in the same dtype (the ring changes the summation
order and merges in fp32), with a floor for the low-precision rounding of O(1) values. One more term for
fp16/bf16: a fused kernel returns each block's output and dK/dV rounded to the input dtype, and the ring
adds those partials in fp32 and rounds the sum once more, so its error may reach two roundings (two ulps)
of the largest value where one monolithic call rounds once.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cp_dtensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
# Half-precision inputs of O(1): one rounding of the output is ~4e-3 (bf16) / ~5e-4 (fp16).
FLOOR = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 2e-5}
B, HQ, D, S = 2, 8, 64, 1024


def _cases() -> list[tuple[str, torch.dtype, bool, int, int]]:
    cases = []
    for backend in BACKENDS:
        dtypes = [torch.bfloat16, torch.float16] + ([torch.float32] if backend == "efficient" else [])
        for dtype in dtypes:
            for causal in (True, False):
                for hkv in (8, 2):
                    for cp in (2, 4):
                        cases.append((backend, dtype, causal, hkv, cp))
    return cases


def _id(case: tuple[str, torch.dtype, bool, int, int]) -> str:
    backend, dtype, causal, hkv, cp = case
    return f"{backend}-{str(dtype).removeprefix('torch.')}-{'causal' if causal else 'bidir'}-hkv{hkv}-cp{cp}"


def _sdpa(q, k, v, dout, causal: bool, backend: SDPBackend) -> list[torch.Tensor]:
    """One SDPA call on the full sequence; GQA by repeating KV heads in the graph (the fused kernels of
    torch 2.11 take no enable_gqa for dense inputs), so k.grad / v.grad are summed over each group."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    n_rep = q.shape[1] // k.shape[1]
    k_full, v_full = (t.repeat_interleave(n_rep, dim=1) for t in (k, v))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k_full, v_full, is_causal=causal)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _ulp(magnitude: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` values at ``magnitude``."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude)) if magnitude > 0 else 0.0


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


ERRORS: dict[str, tuple[list[float], list[float]]] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_error_table(report_dir):
    """With ``--report-dir``, write the measured errors of this module as a markdown table."""
    yield
    if report_dir is None or not ERRORS:
        return
    lines = [
        f"CUDA kernels in the ring schedule vs fp64 SDPA ({torch.cuda.get_device_name()}, torch {torch.__version__})",
        "",
        "| case | out | dq | dk | dv | single-process out / dq / dk / dv |",
        "|---|---|---|---|---|---|",
    ]
    for case_id, (cp, single) in ERRORS.items():
        lines.append(
            f"| {case_id} | "
            + " | ".join(f"{e:.1e}" for e in cp)
            + " | "
            + " / ".join(f"{e:.1e}" for e in single)
            + " |"
        )
    (report_dir / "cuda_errors.md").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_ring_with_cuda_kernel_matches_fp64(case: tuple[str, torch.dtype, bool, int, int]) -> None:
    backend, dtype, causal, hkv, cp = case
    gen = torch.Generator(device="cuda").manual_seed(1234)
    q, dout = (torch.randn(B, HQ, S, D, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, hkv, S, D, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    want = _sdpa(q.double(), k.double(), v.double(), dout.double(), causal, SDPBackend.MATH)
    try:
        single = _sdpa(q, k, v, dout, causal, BACKENDS[backend])
    except RuntimeError as e:  # this GPU / build has no such kernel for this shape and dtype
        pytest.skip(f"monolithic {backend} SDPA unavailable here: {str(e).splitlines()[0]}")
    got = cp_dtensor.simulate_context_parallel_attention(
        q, k, v, cp, grad_out=dout, is_causal=causal, scale=1.0 / math.sqrt(D), backend=backend
    )
    errs_cp = [_max_err(getattr(got, n), w) for n, w in zip(("out", "dq", "dk", "dv"), want)]
    errs_single = [_max_err(s, w) for s, w in zip(single, want)]
    ERRORS[_id(case)] = (errs_cp, errs_single)
    for name, e_cp, e_single, w in zip(("out", "dq", "dk", "dv"), errs_cp, errs_single, want):
        bound = max(2.0 * e_single, FLOOR[dtype], 2.0 * _ulp(w.abs().max().item(), dtype))
        assert e_cp <= bound, f"{_id(case)} {name}: CP error {e_cp:.2e} > {bound:.2e} (single {e_single:.2e})"


def test_fp32_ring_equals_one_fp32_call() -> None:
    """With the fp32 efficient kernel the ring equals one monolithic fp32 call within fp32 rounding."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    q, k, v, dout = (torch.randn(1, 4, 512, 64, device="cuda", generator=gen) for _ in range(4))
    single = _sdpa(q, k, v, dout, True, BACKENDS["efficient"])
    got = cp_dtensor.simulate_context_parallel_attention(
        q, k, v, 4, grad_out=dout, is_causal=True, backend="efficient"
    )
    for name, s in zip(("out", "dq", "dk", "dv"), single):
        assert _max_err(getattr(got, name), s) <= 1e-5, name


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
@pytest.mark.parametrize("mask", ["documents", "window", "documents+window"])
def test_masked_ring_with_cuda_kernel_matches_fp64(backend: str, mask: str) -> None:
    """Packed documents / sliding windows: the exact pieces (FULL, LOWER, UPPER via row reversal) on the CUDA
    kernels inside the masked ring of CP = 4, against fp64 SDPA with the dense mask. Bound: 3 x the
    error of the monolithic masked call in bf16 (efficient: the dense-mask math SDPA in bf16) or a floor,
    as the bf16 ring cases in test_masked_attention.py."""
    from cp_dtensor.attention.mask import AttentionMask

    dtype, cp = torch.bfloat16, 4
    gen = torch.Generator(device="cuda").manual_seed(99)
    q, dout = (torch.randn(B, HQ, S, D, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, 2, S, D, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    ids = None
    if "documents" in mask:
        ids = torch.zeros(B, S, dtype=torch.int64)
        for cut in (97, 300, 301, 700, 900):  # a one-token document, boundaries inside shards
            ids[:, cut:] += 1
    window = (127, 0) if "window" in mask else (-1, -1)
    masks = AttentionMask(True, window, ids).dense(S).unsqueeze(1).cuda()  # (B or 1, 1, S, S)

    def dense(dt: torch.Tensor) -> list[torch.Tensor]:
        qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=masks, enable_gqa=True)
        out.backward(dout.to(dt))
        return [out.detach(), qq.grad, kk.grad, vv.grad]

    want, single = dense(torch.float64), dense(dtype)
    try:
        got = cp_dtensor.simulate_context_parallel_attention(
            q, k, v, cp, grad_out=dout, is_causal=True, document_ids=ids, window_size=window, backend=backend
        )
    except RuntimeError as e:
        pytest.skip(f"{backend} unavailable for these shapes here: {str(e).splitlines()[0]}")
    for name, w, s in zip(("out", "dq", "dk", "dv"), want, single):
        e_cp, e_single = _max_err(getattr(got, name), w), _max_err(s, w)
        ERRORS[f"masked-{mask}-{backend}-{name}"] = ([e_cp], [e_single])
        assert e_cp <= max(3.0 * e_single, FLOOR[dtype]), (
            f"{mask} {backend} {name}: {e_cp:.2e} vs single {e_single:.2e}"
        )


def test_comm_wait_on_cuda_is_timed_by_events() -> None:
    """A CUDA wait is timed by events on the stream (host wall time would miss it); settle() adds it."""
    from cp_dtensor.attention.transport import Pending, timed_wait

    stats = cp_dtensor.AttentionStats()
    dev = torch.device("cuda")
    # The "wait" enqueues ~50 ms of GPU sleep on the current stream: the host returns at once.
    timed_wait(Pending(lambda: torch.cuda._sleep(50_000_000), dev), stats)
    assert stats.comm_wait_seconds == 0.0
    stats.settle()
    assert stats.comm_wait_seconds > 0.005
