"""The quantized ops (runtime/ops) against their plain-torch reference, on every CPU build this machine runs."""

from __future__ import annotations

import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from runtime import ops
from runtime.ops import reference
from runtime.ops.cpu_extension import load
from tests.test_dequantize import random_tensor

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
         T.IQ4_NL, T.IQ4_XS, T.F16, T.BF16]  # fmt: skip
# float32 sums in another order than torch's GEMM: a few ulps of the largest output.
REL = 2e-6


def weight(qt: T, n: int, k: int, seed: int = 0) -> torch.Tensor:
    bs, _ = GGML_QUANT_SIZES[qt]
    return torch.from_numpy(random_tensor(qt, n * k // bs, seed=seed).copy()).view(n, -1)


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_dequantize_bit_exact(qt, isa):
    w = weight(qt, 37, 512)
    assert torch.equal(ops.dequantize(w, int(qt), 512), reference.dequantize(w, int(qt), 512))


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_qmatmul_matches_reference(qt, isa):
    k = 512 if GGML_QUANT_SIZES[qt][0] == 256 else 96  # odd block counts per row
    w = weight(qt, 45, k, seed=1)  # 45 rows: uneven thread chunks
    for t in (1, 2, 3, 4, 5, 8, 9, 64):  # the fused 1-4 row groups, their remainders, the GEMM path
        x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
        want = reference.qmatmul(x, w, int(qt), k)
        got = ops.qmatmul(x, w, int(qt), k)
        assert got.shape == (t, 45) and got.dtype == torch.float32
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < REL, f"{qt.name} t={t}: relative error {err:.2e}"


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_qmatmul_bf16_matches_reference(qt, isa):
    """bfloat16 operands, float32 sums: only the order of the sums may differ from the reference."""
    kernels = load()
    # the AVX512-BF16 kernel where this build and CPU have it, and the other path of the same build
    for native in [True, False] if kernels.bf16_dot() else [False]:
        kernels.allow_bf16_dot(native)
        try:
            _check_qmatmul_bf16(qt)
        finally:
            kernels.allow_bf16_dot(True)


def _check_bf16_rows(matmul, qt: T, n: int, ts: tuple[int, ...], seed: int) -> None:
    """matmul(x, W) against the exact product of the bfloat16-rounded operands, t rows at a
    time, and each row alone giving the same bits (a request never depends on its batch)."""
    k = 512 if GGML_QUANT_SIZES[qt][0] == 256 else 96  # odd block counts per row
    w = weight(qt, n, k, seed=seed)
    wr = reference.dequantize(w, int(qt), k).bfloat16().double()
    for t in ts:
        x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
        want = x.bfloat16().double() @ wr.T  # exact products of the rounded operands
        scale = x.bfloat16().double().abs() @ wr.abs().T  # what float32 sums can lose is relative to this
        got = matmul(x, w, int(qt), k)
        assert got.shape == (t, n) and got.dtype == torch.float32
        err = ((got - want).abs() / scale.clamp_min(1e-30)).max().item()
        assert err < 1e-6, f"{qt.name} n={n} t={t}: error {err:.2e} of the products' magnitude"
        alone = torch.cat([matmul(x[i : i + 1], w, int(qt), k) for i in range(t)])
        assert torch.equal(alone, got), f"{qt.name} n={n} t={t}: a row changed with the batch"


def _check_qmatmul_bf16(qt: T) -> None:
    _check_bf16_rows(ops.qmatmul_bf16, qt, 45, (1, 2, 5, 8, 9, 17, 64), seed=2)  # the 1-8 row groups, remainders


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_qgemm_bf16_matches_reference(qt, isa):
    """The prompt GEMM: qmatmul_bf16's quantity for any row count, each row the same alone."""
    for n in (45, 100):  # a partial panel of 64 output rows; a whole one and a partial
        _check_bf16_rows(ops.qgemm_bf16, qt, n, (1, 5, 6, 7, 13, 17, 64), seed=n)  # the 6-row tiles, remainders


def test_qgemm_bf16_without_bf16_units(kernels):
    """CPUs without AVX512-BF16 compute the same quantity (the row kernels), rows alone too."""
    w = weight(T.Q4_K, 50, 256, seed=6)
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(6))
    fast = ops.qgemm_bf16(x, w, int(T.Q4_K), 256)
    kernels.allow_bf16_dot(False)
    try:
        slow = ops.qgemm_bf16(x, w, int(T.Q4_K), 256)
        assert torch.equal(slow, torch.cat([ops.qgemm_bf16(x[i : i + 1], w, int(T.Q4_K), 256) for i in range(20)]))
    finally:
        kernels.allow_bf16_dot(True)
    want = x.bfloat16().double() @ reference.dequantize(w, int(T.Q4_K), 256).bfloat16().double().T
    scale = want.abs().max()
    assert ((fast - want).abs().max() / scale).item() < 1e-6
    assert ((slow - want).abs().max() / scale).item() < 1e-6


def test_prompt_rows_take_the_gemm_whatever_their_number(kernels):
    """Under gemm_precision("bfloat16") qmatmul_prompt is qgemm_bf16 for 1 row as for 64."""
    w = weight(T.Q5_0, 64, 256, seed=7)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(7))
    with ops.gemm_precision("bfloat16"):
        for t in (1, 3, 64):
            assert torch.equal(ops.qmatmul_prompt(x[:t], w, int(T.Q5_0), 256), ops.qgemm_bf16(x[:t], w, int(T.Q5_0), 256))
    with ops.gemm_precision("float32"):
        assert torch.equal(ops.qmatmul_prompt(x, w, int(T.Q5_0), 256), ops.qmatmul(x, w, int(T.Q5_0), 256))


def test_qmatmul_bf16_rounds_both_operands(kernels):
    """Not float32 in disguise: the result equals the rounded operands' product, not the exact one."""
    w = weight(T.Q8_0, 64, 256, seed=4)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(5)) * (1 + 1e-3)
    got = ops.qmatmul_bf16(x, w, int(T.Q8_0), 256).double()
    wf = reference.dequantize(w, int(T.Q8_0), 256).double()
    rounded = x.bfloat16().double() @ wf.bfloat16().double().T
    exact = x.double() @ wf.T
    scale = exact.abs().max()
    assert ((got - rounded).abs().max() / scale).item() < 1e-6
    assert ((got - exact).abs().max() / scale).item() > 1e-4  # bfloat16 rounding shows
    assert ((got - exact).abs().max() / scale).item() < 2e-2


def test_bfloat16_gemm_keeps_float32_accuracy(kernels):
    """--gemm-dtype bfloat16: oneDNN's bf16 math mode, float32 in and out, within ~1e-6 on both paths."""
    w = weight(T.Q4_K, 64, 512)
    x = torch.randn(32, 512, generator=torch.Generator().manual_seed(3))
    exact = reference.qmatmul(x.double(), w, int(T.Q4_K), 512)  # float64 products
    matmul = torch.backends.mkldnn.matmul  # torch's own setting: only our GEMM changes it
    before = matmul.fp32_precision
    with ops.gemm_precision("bfloat16"):
        assert kernels.gemm_bf16()
        fast = ops.qmatmul(x, w, int(T.Q4_K), 512)  # 32 rows: the GEMM path
        small = ops.qmatmul(x[:8], w, int(T.Q4_K), 512)  # up to 8 rows: the fused kernels
        assert matmul.fp32_precision == before
    assert not kernels.gemm_bf16()  # process-wide: restored
    with ops.gemm_precision("float32"):
        ieee = ops.qmatmul(x, w, int(T.Q4_K), 512)
    scale = exact.abs().max()
    assert fast.dtype == torch.float32
    # plain bfloat16 operands would be ~1e-2 off; the split operands stay near float32's 4e-7
    assert ((fast - exact).abs().max() / scale).item() < 3e-6
    assert ((ieee - exact).abs().max() / scale).item() < REL
    assert ((small - fast[:8]).abs().max() / scale).item() < 3e-6
    with pytest.raises(ValueError, match="gemm dtype"):
        with ops.gemm_precision("int4"):
            pass


def test_threads_do_not_change_results(kernels):
    w = weight(T.Q4_K, 1000, 256)
    x = torch.randn(3, 256)
    one = ops.qmatmul(x, w, int(T.Q4_K), 256)
    try:
        ops.set_num_threads(2)
        assert torch.equal(ops.qmatmul(x, w, int(T.Q4_K), 256), one)
    finally:
        ops.set_num_threads(0)


def test_fake_kernels_and_schema(kernels):
    """torch.library's own consistency checks (schema, fake kernel, no aliasing)."""
    w = weight(T.Q8_0, 8, 64)
    torch.library.opcheck(torch.ops.gguf_serve.qmatmul, (torch.randn(2, 64), w, int(T.Q8_0), 64))
    torch.library.opcheck(torch.ops.gguf_serve.qmatmul_bf16, (torch.randn(2, 64), w, int(T.Q8_0), 64))
    torch.library.opcheck(torch.ops.gguf_serve.qgemm_bf16, (torch.randn(2, 64), w, int(T.Q8_0), 64))
    torch.library.opcheck(torch.ops.gguf_serve.dequantize, (w, int(T.Q8_0), 64))


def test_bad_input_is_an_error_not_a_crash(kernels):
    w = weight(T.Q8_0, 4, 64)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.qmatmul(torch.randn(2, 32), w, int(T.Q8_0), 64)
    with pytest.raises(RuntimeError, match="uint8"):
        ops.qmatmul(torch.randn(2, 64), w.float(), int(T.Q8_0), 64)
    with pytest.raises(RuntimeError, match="no CPU kernel"):
        ops.qmatmul(torch.randn(2, 64), w, 99, 64)
    with pytest.raises(RuntimeError, match="do not hold"):  # rows too short: never read past them
        ops.qmatmul(torch.randn(2, 128), w, int(T.Q8_0), 128)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.qmatmul_bf16(torch.randn(2, 32), w, int(T.Q8_0), 64)
    with pytest.raises(RuntimeError, match="no CPU kernel"):
        ops.qmatmul_bf16(torch.randn(2, 64), w, 99, 64)
    with pytest.raises(RuntimeError, match="do not hold"):
        ops.qmatmul_bf16(torch.randn(2, 128), w, int(T.Q8_0), 128)
    with pytest.raises(RuntimeError, match="do not hold"):
        ops.dequantize(w, int(T.Q4_K), 64)


def test_ninja_is_found_next_to_the_interpreter(monkeypatch, tmp_path):
    """A venv used without activation: cpp_extension still finds the venv's ninja."""
    import shutil
    import sys
    from pathlib import Path

    from runtime.ops.cpu_extension import _find_ninja

    if not (Path(sys.executable).parent / "ninja").exists():
        pytest.skip("ninja is not installed next to this interpreter")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    assert shutil.which("ninja") is None
    _find_ninja()
    assert shutil.which("ninja") == str(Path(sys.executable).parent / "ninja")


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_start(tmp_path):
    """cpp_extension waits forever on its lock file; a build killed mid-way leaves it behind."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from runtime.ops.cpu_extension import build_dir

    lock = build_dir() / "lock"
    lock.touch()  # as a killed builder leaves it
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-m", "runtime.ops.cpu_extension"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "left by a kernel build that was killed" in r.stderr
    assert not lock.exists()
