"""The three low-precision GEMMs through jax.grad, Dense and Conv hooks."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from accel.lowprec import formats as F
from accel.lowprec import gemm as G
from accel.models.transformer import TransformerConfig, TransformerLM
from tests import lowprec_reference as ref

FP32_GEMM = G.GemmSettings(operand_fmt='fp32', acc_fmt='fp32', chunk_size=8)
FP32_LAYER = G.LayerSettings(FP32_GEMM, FP32_GEMM, FP32_GEMM)
MIXED = G.LayerSettings(
    fwd=G.GemmSettings('e5m2', 'e6m9', chunk_size=4),
    bwd_data=G.GemmSettings('e5m2', 'bf16', chunk_size=2),
    bwd_weight=G.GemmSettings('e4m3', 'fp16', chunk_size=8))


def _q(x, fmt):
  return np.asarray(F.quantize(np.asarray(x, np.float32), fmt))


def test_three_gemms_through_grad_match_reference():
  rng = np.random.default_rng(0)
  a, w, c = (rng.standard_normal(s).astype(np.float32) for s in [(5, 12), (12, 3), (5, 3)])
  dot = G.LowPrecDotGeneral(MIXED)
  f = lambda a, w: jnp.sum(dot(a, w, (((1,), (0,)), ((), ()))) * c)
  val, (da, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(a, w)
  y = ref.chunked_dot(_q(a, F.E5M2), _q(w, F.E5M2), F.FP32, F.E6M9, 4)
  np.testing.assert_allclose(val, np.sum(y * c), rtol=1e-6)
  np.testing.assert_array_equal(
      da, ref.chunked_dot(_q(c, F.E5M2), _q(w, F.E5M2).T, F.FP32, F.BF16, 2))
  np.testing.assert_array_equal(
      dw, ref.chunked_dot(_q(a, F.E4M3).T, _q(c, F.E4M3), F.FP32, F.FP16, 8))


def test_fp32_settings_reproduce_dense_and_its_gradients():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 6)).astype(np.float32)
  dense = lambda dg: nn.Dense(4, dot_general=dg)
  params = dense(lax.dot_general).init(jax.random.key(0), x)
  def loss(dg, p):
    return jnp.sum(jnp.sin(dense(dg).apply(p, x)))
  g_ref = jax.grad(lambda p: loss(lax.dot_general, p))(params)
  g_low = jax.grad(lambda p: loss(G.LowPrecDotGeneral(FP32_LAYER), p))(params)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), g_ref, g_low)


def test_conv_hook_matches_lax_conv_in_fp32_and_grads():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
  conv = lambda cg: nn.Conv(5, (3, 2), strides=(2, 1), padding='SAME', conv_general_dilated=cg)
  params = conv(lax.conv_general_dilated).init(jax.random.key(0), x)
  def loss(cg, p, x):
    return jnp.sum(jnp.cos(conv(cg).apply(p, x)))
  ref_val, ref_g = jax.value_and_grad(lambda p, x: loss(lax.conv_general_dilated, p, x), (0, 1))(params, x)
  low_val, low_g = jax.value_and_grad(lambda p, x: loss(G.LowPrecConv(FP32_LAYER), p, x), (0, 1))(params, x)
  np.testing.assert_allclose(low_val, ref_val, rtol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), ref_g, low_g)


def test_conv_forward_is_the_chunked_gemm_of_its_patches():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((1, 4, 4, 2)).astype(np.float32)
  k = rng.standard_normal((3, 3, 2, 2)).astype(np.float32)
  fwd = G.LayerSettings(fwd=G.GemmSettings('e5m2', 'e6m9', chunk_size=5))
  y = jax.jit(lambda x, k: G.LowPrecConv(fwd)(x, k, (1, 1), 'VALID',
                                              dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, k)
  qx, qk = _q(x, F.E5M2), _q(k, F.E5M2)
  # patch vector ordered (channel, kh, kw)
  patches = np.stack([qx[0, i:i + 3, j:j + 3, :].transpose(2, 0, 1).reshape(-1)
                      for i in range(2) for j in range(2)])
  w = qk.transpose(2, 0, 1, 3).reshape(18, 2)
  np.testing.assert_array_equal(np.asarray(y).reshape(4, 2), ref.chunked_dot(patches, w, F.FP32, F.E6M9, 5))


def test_transformer_trains_through_the_hook():
  fast = G.GemmSettings('e5m2', 'e6m9', chunk_size=8, mode='fast')
  cfg = TransformerConfig(vocab_size=16, num_layers=1, d_model=8, num_heads=2, d_ff=16, max_len=8,
                          dot_general=G.LowPrecDotGeneral(G.LayerSettings(fast, fast, fast)))
  model = TransformerLM(cfg)
  tokens = jnp.arange(16).reshape(2, 8) % 16
  params = TransformerLM(dataclasses.replace(cfg, dot_general=lax.dot_general)).init(jax.random.key(0), tokens)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply(p, tokens) ** 2)))(params)
  g = grads['params']['stack']['layers']['block']['mlp']['fc_in']['kernel']
  assert np.all(np.isfinite(g)) and np.any(g != 0)
  assert np.all(np.asarray(F.is_representable(g, F.E6M9)))


def test_stochastic_gemms_draw_fresh_bits_per_operand_values():
  sr = G.GemmSettings('e5m2', 'e6m9', chunk_size=4, mode='fast', rounding='stochastic')
  dot = G.LowPrecDotGeneral(G.LayerSettings(sr, sr, sr, seed=1))
  a = np.full((64, 8), 1.1, np.float32)    # 1.1 lies between the e5m2 values 1 and 1.25
  w = np.eye(8, dtype=np.float32)
  f = jax.jit(lambda a: dot(a, w, (((1,), (0,)), ((), ()))))
  y1, y2 = np.asarray(f(a)), np.asarray(f(a * np.float32(1.0000001)))
  assert set(np.unique(y1)) == {1.0, 1.25} and not np.array_equal(y1, y2)
  assert abs(y1.mean() - 1.1) < 0.03
