"""VRR Monte Carlo: float32 keeps all variance, fewer bits lose it, chunks recover it."""
import dataclasses

import jax.numpy as jnp
import numpy as np

from accel.lowprec import vrr
from accel.models.cnn import ResNet
from accel.models.transformer import TransformerConfig, TransformerLM


def test_vrr_is_one_for_float32_and_falls_with_fewer_bits():
  n, v23 = vrr.vrr_curve(23, 2048, trials=256)
  assert np.all(np.abs(v23 - 1) < 1e-4)
  _, v4 = vrr.vrr_curve(4, 2048, trials=256)
  _, v7 = vrr.vrr_curve(7, 2048, trials=256)
  assert v4[-1] < 0.8 and v4[-1] < v7[-1] - 0.2   # swamping: a third of the variance lost
  nc, v4c = vrr.vrr_curve(4, 2048, chunk_size=64, trials=256)
  assert nc[0] == 64 and nc[-1] == 2048
  assert v4c[-1] > v4[-1] + 0.2                       # chunking recovers it


def test_smallest_m_acc_picks_the_first_format_meeting_the_criterion():
  ns = np.array([16, 32, 64])
  curves = {4: (ns, np.array([0.999, 0.98, 0.9])), 6: (ns, np.array([1.0, 0.999, 0.995])),
            8: (ns, np.array([1.0, 1.0, 1.0]))}
  assert vrr.smallest_m_acc(16, 0.01, curves) == 4
  assert vrr.smallest_m_acc(64, 0.004, curves) == 8
  assert vrr.smallest_m_acc(20, 0.01, curves) == 6   # next measured length is 32
  assert vrr.smallest_m_acc(64, 0.004, {6: curves[6], 9: (ns, np.array([1, 1, 1.02]))}) is None


def test_lengths_are_read_off_the_models():
  cfg = TransformerConfig(vocab_size=32, num_layers=1, d_model=16, num_heads=2, d_ff=64, max_len=8)
  lm = lambda r: TransformerLM(dataclasses.replace(cfg, dot_general=r.dot_general,
                                                   head_dot_general=r.dot_general))
  lengths = vrr.accumulation_lengths_of(lm, jnp.zeros((4, 8), jnp.int32))
  fwd = sorted(d['fwd'] for _, d in lengths)
  assert fwd == [16, 16, 16, 16, 64]        # qkv, out, fc_in, head (D), fc_out (F)
  assert sorted(d['bwd'] for _, d in lengths) == [16, 16, 32, 48, 64]  # out, fc_out, head V, qkv 3D, fc_in F
  assert {d['grad'] for _, d in lengths} == {32}                       # batch x length
  net = lambda r: ResNet(depth=8, dot_general=r.dot_general, conv_general_dilated=r.conv)
  convs = [d for k, d in vrr.accumulation_lengths_of(net, jnp.zeros((2, 8, 8, 3))) if k == 'conv']
  assert convs[0] == {'fwd': 27, 'bwd': 16, 'grad': 2 * 64}          # stem 3x3x3 -> 16
  assert {'fwd': 9 * 32, 'bwd': 64, 'grad': 2 * 4} in convs          # stage 3, stride 2 on 4x4
