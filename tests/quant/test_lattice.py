"""QAT grid recovery on synthetic checkpoints of each recipe."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qatgguf.errors import QuantizationError
from qatgguf.quant import dequantize, quantize
from qatgguf.quant.grid_signature import grid_signature, recipe_signature
from qatgguf.quant.lattice import block_exactness, detect_grid, scan_grid

from .ggml_ref import ggml_dequantize, ggml_quantize
from .qat_synth import qat2, qat4, qat8, round_bf16

NBLOCKS = 16384


def _q4_codes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sign of d, codes q-8) per block of Q4_0 bytes (nblocks, 18)."""
    d = q[:, :2].copy().view(np.float16)[:, 0].astype(np.float32)
    qs = q[:, 2:].astype(np.int64)
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=1) - 8
    return np.sign(d), codes


RECIPES = ["uniform", "max/-8", "amax/7.5", "amax/7"]
ROUNDINGS = ["f32", "f16", "bf16"]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_q4_0_grid_recovers_codes_and_weights(recipe: str, rounding: str) -> None:
    # a fixed seed per case: the same data on every run and machine
    w, k, s = qat4(NBLOCKS, recipe, rounding, seed=100 + 10 * RECIPES.index(recipe) + ROUNDINGS.index(rounding))
    q = quantize(w.reshape(64, -1), T.Q4_0, grid="qat").reshape(NBLOCKS, 18)
    sign_d, codes = _q4_codes(q)
    codes_ok = np.all(sign_d[:, None] * codes == np.sign(s)[:, None] * k, axis=1)
    assert codes_ok.mean() >= 0.999, codes_ok.mean()
    deq = dequantize(q, T.Q4_0)
    assert np.array_equal(deq, ggml_dequantize(q, T.Q4_0))  # llama.cpp reads the same values
    consistent = np.all(round_bf16(deq) == w, axis=1).mean()
    if rounding == "f32":
        assert consistent >= 0.96, consistent
    else:
        assert consistent == 1.0, consistent
    if rounding == "bf16":  # bf16 scales come back exactly: the decoded weights are s*k
        assert np.array_equal(
            deq, (np.abs(s)[:, None] * (np.sign(s)[:, None] * k)).astype(np.float32)
        )
    # the grid-aligned encoding is never worse than the reference in squared error against w
    ref = ggml_dequantize(ggml_quantize(w.reshape(64, -1), T.Q4_0).reshape(NBLOCKS, 18), T.Q4_0)
    assert np.square(deq - w, dtype=np.float64).sum() <= np.square(ref - w, dtype=np.float64).sum()


def test_recipe_signatures_tell_recipes_apart() -> None:
    expect = {
        "max/-8": "Q4_0-style",
        "amax/7": "symmetric [-7, 7]",
        "amax/7.5": "amax/7.5",
        "uniform": "fixed per-block scale",
    }
    for recipe, words in expect.items():
        for rounding in ("f32", "bf16"):
            w, _, _ = qat4(4096, recipe, rounding, seed=3)
            stats = scan_grid(w, T.Q4_0)
            sig = recipe_signature(stats)
            assert stats.fraction == 1.0
            assert words in str(sig["recipe"]), (recipe, sig)
            assert sig["scale_rounding"] == ("bf16" if rounding == "bf16" else "f32"), (
                recipe,
                rounding,
                sig,
            )
    w, _, _ = qat4(4096, "uniform", "f16", seed=4)
    assert recipe_signature(scan_grid(w, T.Q4_0))["scale_rounding"] == "f16"


@pytest.mark.parametrize("t", [T.Q4_0, T.TQ2_0, T.Q8_0], ids=lambda t: t.name)
def test_plain_weights_never_claim_a_grid(t: T) -> None:
    rng = np.random.default_rng(11)
    w = round_bf16(rng.standard_normal((256, 1024)).astype(np.float32) * 0.02)
    assert scan_grid(w, t).on_grid == 0
    assert np.array_equal(quantize(w, t, grid="qat"), ggml_quantize(w, t))
    # float32 (non-bf16) weights are not a bf16 QAT checkpoint either
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    assert np.array_equal(quantize(x, t, grid="qat"), ggml_quantize(x, t))


def test_off_grid_blocks_fall_back_to_reference() -> None:
    w, k, s = qat4(2048, "amax/7", "f32", seed=5)
    rng = np.random.default_rng(6)
    noisy = w.copy()
    bad = rng.random(2048) < 0.3
    noisy[bad] = round_bf16(rng.standard_normal((int(bad.sum()), 32)).astype(np.float32) * 0.05)
    q = quantize(noisy, T.Q4_0, grid="qat")
    ref = ggml_quantize(noisy, T.Q4_0)
    assert np.array_equal(q[bad], ref[bad])
    sign_d, codes = _q4_codes(q[~bad])
    assert np.all(sign_d[:, None] * codes == np.sign(s[~bad])[:, None] * k[~bad])


def test_all_zero_blocks_on_grid_path() -> None:
    w, _, _ = qat4(64, "uniform", "bf16", seed=8)
    w[::3] = 0.0
    q = quantize(w, T.Q4_0, grid="qat")
    assert np.array_equal(q[::3], ggml_quantize(w[::3], T.Q4_0))
    assert np.array_equal(round_bf16(dequantize(q, T.Q4_0)), w)


@pytest.mark.parametrize("codes", [(-2, 1), (-1, 2), (-1, 1)])
@pytest.mark.parametrize("rounding", ["f32", "bf16"])
def test_tq2_0_grid_is_exact(codes: tuple[int, int], rounding: str) -> None:
    w, _, _ = qat2(2048, codes, rounding, seed=9)
    q = quantize(w.reshape(32, -1), T.TQ2_0, grid="qat").reshape(2048, 66)
    deq = dequantize(q, T.TQ2_0)
    assert np.array_equal(deq, ggml_dequantize(q, T.TQ2_0))
    assert np.array_equal(deq, w)  # bit for bit: w = bf16(s)*k and bf16(s) is an fp16 value
    d = q[:, 64:66].copy().view(np.float16)[:, 0]
    if codes == (-2, 1):
        assert np.all(d < 0)  # {-2,-1,0,1}*s needs the negative scale
    if codes == (-1, 2):
        assert np.all(d > 0)
    if codes == (-1, 1):
        return  # ternary data is on the reference quantizer's grid as well
    naive = ggml_dequantize(ggml_quantize(w.reshape(32, -1), T.TQ2_0).reshape(2048, 66), T.TQ2_0)
    assert not np.array_equal(naive, w)


def test_grid_rejects_other_types() -> None:
    with pytest.raises(QuantizationError, match="grid='qat' supports TQ2_0, Q4_0, Q8_0; got Q4_K"):
        quantize(np.zeros((1, 256), np.float32), T.Q4_K, grid="qat", name="blk.0.ffn_up.weight")
    with pytest.raises(QuantizationError, match="unknown grid"):
        quantize(np.zeros((1, 256), np.float32), T.Q4_0, grid="lattice")


@pytest.mark.parametrize("rounding", ["f32", "bf16"])
def test_grid_threads_do_not_change_bytes(rounding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from qatgguf.quant import api

    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 2048)
    w, _, _ = qat4(NBLOCKS, "max/-8", rounding, seed=7)
    x = w.reshape(64, -1)
    one = quantize(x, T.Q4_0, grid="qat")
    assert np.array_equal(quantize(x, T.Q4_0, grid="qat", threads=3), one)
    w2, _, _ = qat2(NBLOCKS // 8, (-2, 1), rounding, seed=8)
    x2 = w2.reshape(64, -1)
    assert np.array_equal(quantize(x2, T.TQ2_0, grid="qat", threads=3), quantize(x2, T.TQ2_0, grid="qat"))


@pytest.mark.parametrize("rounding", ["f16", "bf16"])
def test_q8_0_grid_recovers_codes_and_weights(rounding: str) -> None:
    w, k, s = qat8(NBLOCKS, rounding, seed=12)
    q = quantize(w.reshape(64, -1), T.Q8_0, grid="qat").reshape(NBLOCKS, 34)
    deq = dequantize(q, T.Q8_0)
    assert np.array_equal(deq, ggml_dequantize(q, T.Q8_0))  # llama.cpp reads the same values
    assert np.array_equal(round_bf16(deq), w)  # every block gives back the checkpoint
    if rounding == "bf16":  # the QAT scale and codes themselves
        d = q[:, :2].copy().view(np.float16)[:, 0].astype(np.float32)
        assert np.array_equal(d, s) and np.array_equal(q[:, 2:].view(np.int8), k)
    exact, total = block_exactness(w.reshape(64, -1), q.reshape(64, -1), T.Q8_0)
    assert (exact, total) == (NBLOCKS, NBLOCKS)
    # ggml's reference recomputes d = amax/127 and loses most blocks of a learned grid
    naive, _ = block_exactness(w.reshape(64, -1), ggml_quantize(w.reshape(64, -1), T.Q8_0), T.Q8_0)
    assert naive < 0.2 * NBLOCKS, naive


def test_q8_0_grid_falls_back_per_block() -> None:
    w, k, _ = qat8(1024, "bf16", seed=13)
    rng = np.random.default_rng(14)
    bad = rng.random(1024) < 0.25
    w[bad] = round_bf16(rng.standard_normal((int(bad.sum()), 32)).astype(np.float32) * 0.05)
    bad[5] = False
    w[5] = 0.0  # an all-zero block: no grid to find, the reference encoding (all zeros)
    good = ~bad
    good[5] = False
    q = quantize(w, T.Q8_0, grid="qat")
    ref = ggml_quantize(w, T.Q8_0)
    assert np.array_equal(q[bad], ref[bad]) and np.array_equal(q[5], ref[5])
    assert np.array_equal(q[good][:, 2:].view(np.int8), k[good].astype(np.int8))
    assert scan_grid(w, T.Q8_0).fraction == pytest.approx(float(good.sum()) / 1024)


def test_detection_takes_the_coarsest_grid() -> None:
    w2, _, _ = qat2(256, (-2, 1), "bf16", seed=15)
    w4, _, _ = qat4(2048, "uniform", "bf16", seed=16)
    w8, _, _ = qat8(2048, "bf16", seed=17)
    plain = round_bf16(np.random.default_rng(18).standard_normal((64, 256)).astype(np.float32) * 0.02)
    # a 2-bit grid is also a 4-bit and an 8-bit grid; a 4-bit grid also an 8-bit one
    found = detect_grid(w2.reshape(64, -1))
    assert found.qtype == "TQ2_0" and found.shares == {"TQ2_0": 1.0}
    assert detect_grid(w2.reshape(64, -1), candidates=("Q4_0", "Q8_0")).qtype == "Q4_0"
    found = detect_grid(w4.reshape(64, -1))
    assert found.qtype == "Q4_0" and found.shares["TQ2_0"] == 0.0
    found = detect_grid(w8.reshape(64, -1))
    assert found.qtype == "Q8_0" and found.shares == {"TQ2_0": 0.0, "Q4_0": 0.0, "Q8_0": 1.0}
    assert detect_grid(plain).qtype is None
    # TQ2_0 needs rows of 256: a row of 96 is only scanned for the 32-blocks
    assert detect_grid(w4[:1536].reshape(-1, 96)).shares.keys() == {"Q4_0"}
    with pytest.raises(QuantizationError, match="got Q6_K"):
        detect_grid(w4, candidates=("Q6_K",))


def test_tq2_0_signature_counts_negative_scales() -> None:
    w, _, _ = qat2(512, (-2, 1), "bf16", seed=19)
    w_pos, _, _ = qat2(512, (-1, 2), "bf16", seed=20)
    mixed = np.concatenate([w, w_pos])
    sig = grid_signature(scan_grid(mixed, T.TQ2_0), T.TQ2_0)
    assert "negative scale in 50.0% of blocks" in str(sig["recipe"]) and sig["scale_rounding"] == "bf16"
    q = quantize(mixed, T.TQ2_0, grid="qat")
    d = q[:, 64:66].copy().view(np.float16)[:, 0]
    assert np.all(d[:512] < 0) and np.all(d[512:] > 0)
    sig8 = grid_signature(scan_grid(qat8(512, "bf16", seed=21)[0], T.Q8_0), "Q8_0")
    assert "8-bit grid" in str(sig8["recipe"])


def test_learned_scales_have_their_own_signature() -> None:
    """LSQ-style scales leave the block maximum on many codes; max-derived rules do not."""
    rng = np.random.default_rng(22)
    z = rng.standard_normal((4096, 32)) * 0.02
    s = round_bf16((np.abs(z).max(axis=1) / rng.uniform(5.0, 8.0, 4096)).astype(np.float32))
    w = round_bf16((s[:, None] * np.clip(np.rint(z / s[:, None]), -8, 7)).astype(np.float32))
    sig = recipe_signature(scan_grid(w, T.Q4_0))
    assert "learned per-block scale" in str(sig["recipe"]), sig


def test_block_exactness_counts_blocks_of_32() -> None:
    w, _, _ = qat2(64, (-2, 1), "bf16", seed=23)
    aligned = quantize(w, T.TQ2_0, grid="qat")
    assert block_exactness(w, aligned, T.TQ2_0) == (64 * 8, 64 * 8)
    naive = ggml_quantize(w, T.TQ2_0)
    exact, total = block_exactness(w, naive, T.TQ2_0)
    assert total == 512 and exact < 512
    with pytest.raises(QuantizationError, match="decoded 16384 values"):
        block_exactness(w[:32], aligned, T.TQ2_0)


def test_q8_0_grid_threads_do_not_change_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    from qatgguf.quant import api

    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 2048)
    w, _, _ = qat8(4096, "bf16", seed=24)
    x = w.reshape(64, -1)
    assert np.array_equal(quantize(x, T.Q8_0, grid="qat", threads=3), quantize(x, T.Q8_0, grid="qat"))
