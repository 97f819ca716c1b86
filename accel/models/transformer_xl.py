"""Transformer-XL (Dai et al. 2019, arXiv 1901.02860), Flax linen.

Shapes are carried in names: B batch, L segment (query) length, M memory length,
T = M + L key length, N layers, D model width, H heads, K head width, F feed-forward width,
V vocabulary.

Segment-level recurrence (section 3.2): layer n attends to [mem_n ; x_n], where mem_n holds
the last M inputs of layer n from the previous segments, and returns
new_mem_n = stop_gradient([mem_n ; x_n][-M:]). Memory starts as zeros (as the public TF
code does); a caller keeps it across segments.

Relative positional attention (section 3.3), per head, query i (key position M + i) and key j:
  score[i, j] = (q_i + u) . k_j  +  (q_i + v) . W_r R[M + i - j],       all / sqrt(K)
with R[d] = [sin(d w), cos(d w)], w_c = 10000^(-2c/D), and keys j > M + i masked. The second
term is computed for all T distances at once and aligned by `rel_shift` (the pad-and-reshape
trick of the public code). u, v and W_r are per layer (the public code's `untie_r=True`; its
base GPU scripts share u, v across layers): every parameter of a layer stays in the layer's
pipeline stage.

Blocks: PostLN (the original)  h = LN1(x + Attn(x, mem));   out = LN2(h + FF(h))
        PreLN                  h = x + Attn(LN1(x), LN1(mem)); out = h + FF(LN2(h)), and LN_f
                               before the output.
FF(x) = W2 relu(W1 x + b1) + b2. Embedding E[tokens] * sqrt(D); output logits = h E^T + b
(tied), or with `adaptive_cutoffs` the adaptive softmax's log-probabilities
(`accel.models.adaptive_softmax`, div_val 1, tied: the WikiText-103 model). Dropout (rate `dropout_rate`) after the embedding, the attention output, the FF
hidden and output, and the last hidden state (the public code's `dropout`; its `dropatt` and
the dropout on R are not modelled).

Hooks, as in `accel.models.transformer`: every Dense of the blocks calls `cfg.dot_general`,
the tied output projection `cfg.head_dot_general`. The blocks are stored in the scan layout
(params['stack']['layers'], leading axis N), so a pipeline runs a consecutive layer range
[start, stop) with `run_layers` on the slice of the parameters and of the memory: each stage
keeps the memory of its own layers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from accel.models import adaptive_softmax

DotGeneral = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class TransformerXLConfig:
  """Architecture of one Transformer-XL; `accel.models.build_model` fills it from config."""
  vocab_size: int = 256
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  d_ff: int = 1024
  mem_len: int = 256
  dropout_rate: float = 0.0
  pre_ln: bool = False
  dtype: Any = jnp.float32          # compute dtype; parameters stay float32
  dot_general: DotGeneral = lax.dot_general
  head_dot_general: DotGeneral = lax.dot_general
  adaptive_cutoffs: tuple = ()      # () plain softmax; else the adaptive softmax's cutoffs


def _dense(cfg: TransformerXLConfig, features: int, name: str, use_bias: bool) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, dot_general=cfg.dot_general,
                  kernel_init=nn.initializers.normal(0.02), name=name)


def sinusoid(distances_T: jax.Array, d_model: int) -> jax.Array:
  """R[t] = [sin(d_t w), cos(d_t w)], w_c = 10000^(-2c/D), c = 0..D/2-1 (float32)."""
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))
  angles_TxC = distances_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.concatenate([jnp.sin(angles_TxC), jnp.cos(angles_TxC)], axis=-1)


def rel_shift(x_LxT: jax.Array) -> jax.Array:
  """out[..., i, j] = x[..., i, j + L - 1 - i] for j <= i + (T - L); other entries are junk.

  With column k of x holding distance T - 1 - k, out[i, j] holds distance (T - L + i) - j,
  the distance from query i (key position T - L + i) to key j. Pad one zero column in front,
  read the [L, T+1] buffer as [T+1, L], drop its first row and read it back as [L, T].
  """
  *lead, l, t = x_LxT.shape
  padded = jnp.pad(x_LxT, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
  return padded.reshape(*lead, t + 1, l)[..., 1:, :].reshape(*lead, l, t)


def causal_mask(l: int, m: int) -> jax.Array:
  """mask[i, j] = j <= m + i: query i sees the memory and the segment up to itself."""
  return jnp.arange(m + l)[None, :] <= m + jnp.arange(l)[:, None]


class RelativeAttention(nn.Module):
  """Multi-head attention with relative positions and memory (section 3.3, formula above)."""
  cfg: TransformerXLConfig

  @nn.compact
  def __call__(self, x_BxLxD, mem_BxMxD, deterministic: bool):
    cfg = self.cfg
    h, k = cfg.num_heads, cfg.d_model // cfg.num_heads
    b, l, _ = x_BxLxD.shape
    m = mem_BxMxD.shape[1]
    t = m + l
    cat_BxTxD = jnp.concatenate([mem_BxMxD.astype(x_BxLxD.dtype), x_BxLxD], axis=1)
    q_BxLxHxK = _dense(cfg, cfg.d_model, 'q', False)(x_BxLxD).reshape(b, l, h, k)
    kv_BxTx2xHxK = _dense(cfg, 2 * cfg.d_model, 'kv', False)(cat_BxTxD).reshape(b, t, 2, h, k)
    key_BxTxHxK, val_BxTxHxK = kv_BxTx2xHxK[:, :, 0], kv_BxTx2xHxK[:, :, 1]
    r_TxD = sinusoid(jnp.arange(t - 1, -1, -1), cfg.d_model).astype(cfg.dtype)
    rk_TxHxK = _dense(cfg, cfg.d_model, 'r', False)(r_TxD).reshape(t, h, k)
    u_HxK = self.param('u', nn.initializers.normal(0.02), (h, k)).astype(cfg.dtype)
    v_HxK = self.param('v', nn.initializers.normal(0.02), (h, k)).astype(cfg.dtype)

    content_BxHxLxT = jnp.einsum('blhk,bthk->bhlt', q_BxLxHxK + u_HxK, key_BxTxHxK)
    position_BxHxLxT = rel_shift(jnp.einsum('blhk,thk->bhlt', q_BxLxHxK + v_HxK, rk_TxHxK))
    scores_BxHxLxT = (content_BxHxLxT + position_BxHxLxT).astype(jnp.float32) / math.sqrt(k)
    scores_BxHxLxT = jnp.where(causal_mask(l, m), scores_BxHxLxT, -1e30)
    probs_BxHxLxT = jax.nn.softmax(scores_BxHxLxT, axis=-1).astype(cfg.dtype)
    out_BxLxHxK = jnp.einsum('bhlt,bthk->blhk', probs_BxHxLxT, val_BxTxHxK)
    out_BxLxD = _dense(cfg, cfg.d_model, 'out', False)(out_BxLxHxK.reshape(b, l, h * k))
    return nn.Dropout(cfg.dropout_rate)(out_BxLxD, deterministic=deterministic)


class FeedForward(nn.Module):
  cfg: TransformerXLConfig

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool):
    cfg = self.cfg
    h_BxLxF = nn.relu(_dense(cfg, cfg.d_ff, 'fc_in', True)(x_BxLxD))
    h_BxLxF = nn.Dropout(cfg.dropout_rate)(h_BxLxF, deterministic=deterministic)
    out_BxLxD = _dense(cfg, cfg.d_model, 'fc_out', True)(h_BxLxF)
    return nn.Dropout(cfg.dropout_rate)(out_BxLxD, deterministic=deterministic)


class XLBlock(nn.Module):
  """One layer; PostLN or PreLN (module docstring)."""
  cfg: TransformerXLConfig

  @nn.compact
  def __call__(self, x_BxLxD, mem_BxMxD, deterministic: bool = True):
    cfg = self.cfg
    ln1 = nn.LayerNorm(dtype=cfg.dtype, name='ln1')
    ln2 = nn.LayerNorm(dtype=cfg.dtype, name='ln2')
    attn = RelativeAttention(cfg, name='attn')
    ff = FeedForward(cfg, name='ff')
    if cfg.pre_ln:
      h_BxLxD = x_BxLxD + attn(ln1(x_BxLxD), ln1(mem_BxMxD), deterministic)
      return h_BxLxD + ff(ln2(h_BxLxD), deterministic)
    h_BxLxD = ln1(x_BxLxD + attn(x_BxLxD, mem_BxMxD, deterministic))
    return ln2(h_BxLxD + ff(h_BxLxD, deterministic))


def next_memory(mem_BxMxD, x_BxLxD):
  """stop_gradient([mem ; x][-M:]): the last M inputs of this layer (section 3.2)."""
  m = mem_BxMxD.shape[1]
  cat_BxTxD = jnp.concatenate([mem_BxMxD, x_BxLxD.astype(mem_BxMxD.dtype)], axis=1)
  return lax.stop_gradient(cat_BxTxD[:, cat_BxTxD.shape[1] - m:])


class _ScanBody(nn.Module):
  """One scan step: carries x, scans the layer's memory in and its next memory out."""
  cfg: TransformerXLConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxD, mem_BxMxD):
    out_BxLxD = XLBlock(self.cfg, name='block')(x_BxLxD, mem_BxMxD, self.deterministic)
    return out_BxLxD, next_memory(mem_BxMxD, x_BxLxD)


class XLBlockStack(nn.Module):
  """`num_layers` layers, scanned; params['layers'] leaves have a leading axis N.

  (x_BxLxD, mems_NxBxMxD) -> (h_BxLxD, new_mems_NxBxMxD).
  """
  cfg: TransformerXLConfig
  num_layers: int

  @nn.compact
  def __call__(self, x_BxLxD, mems_NxBxMxD, deterministic: bool = True):
    scanned = nn.scan(_ScanBody, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=0, out_axes=0, length=self.num_layers)
    return scanned(self.cfg, deterministic, name='layers')(x_BxLxD, mems_NxBxMxD)


def zero_memory(cfg: TransformerXLConfig, batch: int, num_layers: int | None = None):
  """The memory of a fresh stream: zeros [N, B, M, D] in the compute dtype."""
  n = cfg.num_layers if num_layers is None else num_layers
  return jnp.zeros((n, batch, cfg.mem_len, cfg.d_model), cfg.dtype)


def run_layers(cfg: TransformerXLConfig, layers, x_BxLxD, mems_NxBxMxD,
               deterministic: bool = True, rng: jax.Array | None = None):
  """Layers [start, stop) of a model, given `layers` = params['stack']['layers'][start:stop]
  and their memory mems[start:stop]; returns (h, their next memory). Pure: a pipeline stage
  calls it on its own slice."""
  n = jax.tree_util.tree_leaves(layers)[0].shape[0]
  rngs = {'dropout': rng} if rng is not None else {}
  return XLBlockStack(cfg, n).apply({'params': {'layers': layers}}, x_BxLxD, mems_NxBxMxD,
                                    deterministic, rngs=rngs)


class _OutputBias(nn.Module):
  """logits + b_V (a submodule, so that apply of `embed` or `layers` does not need b)."""
  vocab_size: int

  @nn.compact
  def __call__(self, logits_BxLxV):
    return logits_BxLxV + self.param('bias', nn.initializers.zeros, (self.vocab_size,))


class _Memory(nn.Module):
  """The 'mems' collection's variable 'hidden' [N, B, M, D]; returns it, storing `new` first."""
  cfg: TransformerXLConfig

  @nn.compact
  def __call__(self, batch: int, new_NxBxMxD=None):
    memory = self.variable('mems', 'hidden', zero_memory, self.cfg, batch)
    if new_NxBxMxD is not None:
      memory.value = new_NxBxMxD
    return memory.value


class TransformerXL(nn.Module):
  """Transformer-XL LM with tied embeddings.

  `embed`, `layers` and `logits` each need only their own parameters (token_embed;
  stack; token_embed, out_bias, final_ln and adaptive_clusters), so pipeline stages apply them on their pieces.
  `segment(tokens, mems)` is pure: (logits_BxLxV, new_mems_NxBxMxD). `__call__` keeps the
  memory in the 'mems' collection (mems/memory/hidden, [N, B, M, D]): it attends to the stored
  memory and, when 'mems' is mutable, stores the next one, so a training loop carries it
  across steps in its state.
  """
  cfg: TransformerXLConfig

  def setup(self):
    cfg = self.cfg
    self.token_embed = nn.Embed(cfg.vocab_size, cfg.d_model,
                                embedding_init=nn.initializers.normal(0.02))
    self.out_bias = _OutputBias(cfg.vocab_size)
    self.stack = XLBlockStack(cfg, cfg.num_layers)
    self.final_ln = nn.LayerNorm(dtype=cfg.dtype) if cfg.pre_ln else None
    self.adaptive_clusters = (adaptive_softmax.ClusterTokens(
        len(cfg.adaptive_cutoffs), cfg.head_dot_general) if cfg.adaptive_cutoffs else None)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.memory = _Memory(cfg)

  def embed(self, tokens_BxL, deterministic: bool = True):
    """x = dropout(E[tokens] * sqrt(D))."""
    x_BxLxD = self.token_embed(tokens_BxL) * math.sqrt(self.cfg.d_model)
    return self.dropout(x_BxLxD.astype(self.cfg.dtype), deterministic=deterministic)

  def layers(self, x_BxLxD, mems_NxBxMxD, deterministic: bool = True):
    return self.stack(x_BxLxD, mems_NxBxMxD, deterministic)

  def logits(self, h_BxLxD, deterministic: bool = True):
    """logits = (LN_f)(dropout(h)) E^T + b (LN_f only for PreLN); with the adaptive softmax
    its log-probabilities over the same word logits."""
    h_BxLxD = self.dropout(h_BxLxD, deterministic=deterministic)
    if self.final_ln is not None:
      h_BxLxD = self.final_ln(h_BxLxD)
    table_VxD = self.token_embed.embedding.astype(self.cfg.dtype)
    logits_BxLxV = self.cfg.head_dot_general(h_BxLxD, table_VxD, (((2,), (1,)), ((), ())))
    logits_BxLxV = self.out_bias(logits_BxLxV.astype(jnp.float32))
    if self.adaptive_clusters is None:
      return logits_BxLxV
    return adaptive_softmax.log_probs(logits_BxLxV, self.adaptive_clusters(h_BxLxD),
                                      self.cfg.adaptive_cutoffs)

  def segment(self, tokens_BxL, mems_NxBxMxD, deterministic: bool = True):
    x_BxLxD = self.embed(tokens_BxL, deterministic)
    h_BxLxD, new_mems_NxBxMxD = self.layers(x_BxLxD, mems_NxBxMxD, deterministic)
    return self.logits(h_BxLxD, deterministic), new_mems_NxBxMxD

  def __call__(self, tokens_BxL, *, train: bool = False):
    batch = tokens_BxL.shape[0]
    if self.cfg.mem_len == 0:      # nothing to carry (and no empty array in the state)
      return self.segment(tokens_BxL, zero_memory(self.cfg, batch), not train)[0]
    logits_BxLxV, new_mems_NxBxMxD = self.segment(tokens_BxL, self.memory(batch), not train)
    if self.is_mutable_collection('mems') and not self.is_initializing():
      self.memory(batch, new_mems_NxBxMxD)
    return logits_BxLxV
