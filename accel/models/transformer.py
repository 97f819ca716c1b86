"""Transformer language models (decoder LM and bidirectional encoder), Flax linen.

Shapes are carried in names: B batch, L sequence length, D model width, H heads,
K head width, F feed-forward width, V vocabulary.

Hooks the methods attach to, without forking this file:
- `dot_general`: every Dense in the blocks calls it (low-precision GEMMs, `accel.lowprec`).
- `Block.__call__(x, residual_scale)`: the sublayer outputs are multiplied by
  `residual_scale` before the residual add (1/p_l in progressive layer dropping).
- `BlockStack(..., layer_ids_N, keep_probs_N)`: only the N listed blocks run, unrolled,
  their parameters gathered from the stacked layer parameters by index (`accel.layerdrop`).
- Dense outputs are plain `nn.Dense.__call__` results, so `nn.intercept_methods` sees
  every pre-activation (`accel.stdloss`); the unrolled blocks are in the caller's trace.
- `embed`, `BlockStack` over a layer range and `logits` are separate methods, so a
  pipeline (`accel.pipeline`) can run them on different stages.
Parameters: the blocks' are stacked, params['stack']['layers']['block'] with leaves
[num_layers, ...], whether the blocks run scanned, unrolled or a kept subset of them.
Padding: `key_mask_BxL` (True = a real token; None = every token) keeps attention off the
PAD keys of padded inputs (an encoder on GLUE pairs): scores of masked keys are -inf.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DotGeneral = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of one Transformer; `accel.models.build_model` fills it from config."""
  vocab_size: int = 256
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  d_ff: int = 1024
  max_len: int = 256
  dropout_rate: float = 0.0
  pre_ln: bool = True
  causal: bool = True
  dtype: Any = jnp.float32          # compute dtype; parameters stay float32
  # The blocks as one nn.scan over stacked parameters (one block compiled) instead of a
  # Python loop. Slower on GPU, and no GPU preset uses it: on one H200 GPT-2 small steps in
  # 88.4 ms scanned vs 70.3 ms unrolled (1.26x; 79.3 ms scanned with remat, 1.13x;
  # results/bench_lm_gpu_variants.md), and a 12-block BERT-base stack alone 1.50x (the
  # layer-dropping issue's table, issue 14): XLA:GPU brings every loop iteration's
  # predicate back to the host.
  scan_layers: bool = False
  remat: bool = False                # recompute each block in the backward pass
  remat_policy: str = ''             # with remat: what is saved, REMAT_POLICIES
  use_bias: bool = True              # Dense and LayerNorm biases (nanoGPT's `bias`)
  qkv_projection: str = 'fused'      # 'fused': one D x 3D Dense; 'split': three D x D
  # The MLP's backward recomputes the fc_in bias add and the GELU from the matmul's output
  # (saved anyway) instead of keeping the GELU's tanh: one B x L x F tensor less written in
  # the forward and read in the backward per block. An fc_in inside it is in a lifted
  # transform (nn.remat) for accel.stdloss.
  gelu_recompute: bool = False
  # 'broadcast': P[:L] added to every row (its gradient a reduction over the batch, whose
  # preferred layout XLA:GPU propagates to the whole residual stream: the profile of
  # results/bench_lm_gpu_profile.md keeps it L x D x B, transposed around every LayerNorm
  # and matmul); 'gather': P looked up at each token's position like the token embedding
  # (its gradient a scatter-add). Same values.
  position_lookup: str = 'broadcast'
  attention_impl: str | None = None  # jax.nn.dot_product_attention implementation
  dot_general: DotGeneral = lax.dot_general
  head_dot_general: DotGeneral = lax.dot_general


# model.remat_policy -> jax.checkpoint policy: what a rematerialized block keeps from its
# forward pass ('': nothing, the whole block is recomputed).
REMAT_POLICIES = {'': None, 'dots': jax.checkpoint_policies.dots_saveable,
                  'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
QKV_PROJECTIONS = ('fused', 'split')
POSITION_LOOKUPS = ('broadcast', 'gather')
# Primitives a gelu_recompute MLP recomputes in the backward; every other output (the
# matmul's, whatever dot_general computes it) is saved.
_RECOMPUTED = frozenset({'add', 'add_any', 'sub', 'mul', 'div', 'neg', 'integer_pow', 'pow',
                         'tanh', 'erf', 'exp', 'logistic', 'max', 'min', 'select_n',
                         'convert_element_type', 'broadcast_in_dim', 'reshape', 'squeeze',
                         'expand_dims'})


def _save_all_but_elementwise(prim, *_, **__) -> bool:
  return prim.name not in _RECOMPUTED


def _dense(cfg: TransformerConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=cfg.use_bias, dtype=cfg.dtype,
                  dot_general=cfg.dot_general, kernel_init=nn.initializers.normal(0.02),
                  name=name)


def _layer_norm(cfg: TransformerConfig, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(use_bias=cfg.use_bias, dtype=cfg.dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention on jax.nn.dot_product_attention's B x L x H x K layout.

  qkv_projection 'fused': one Dense to 3D, whose q, k, v are strided slices of its output
  (copied into dense B x L x H x K operands for cuDNN, their gradients concatenated back);
  'split': three Dense layers 'query', 'key', 'value', each output already B x L x H x K.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, deterministic: bool,
               key_mask_BxL: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    head_dim = cfg.d_model // cfg.num_heads
    b, l, _ = x_BxLxD.shape
    if cfg.qkv_projection == 'split':
      q, k, v = (_dense(cfg, cfg.d_model, name)(x_BxLxD).reshape(b, l, cfg.num_heads, head_dim)
                 for name in ('query', 'key', 'value'))
    else:
      qkv_BxLx3D = _dense(cfg, 3 * cfg.d_model, 'qkv')(x_BxLxD)
      qkv_BxLx3xHxK = qkv_BxLx3D.reshape(b, l, 3, cfg.num_heads, head_dim)
      q, k, v = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
    mask = None if key_mask_BxL is None else key_mask_BxL[:, None, None, :]
    out_BxLxHxK = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=cfg.causal, implementation=cfg.attention_impl)
    out_BxLxD = out_BxLxHxK.reshape(b, l, cfg.d_model)
    out_BxLxD = _dense(cfg, cfg.d_model, 'out')(out_BxLxD)
    return nn.Dropout(cfg.dropout_rate)(out_BxLxD, deterministic=deterministic)


class MLP(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    fc_in = _dense(cfg, cfg.d_ff, 'fc_in')
    if cfg.gelu_recompute:
      h_BxLxF = nn.remat(lambda mdl, x: nn.gelu(mdl(x)),
                         policy=_save_all_but_elementwise)(fc_in, x_BxLxD)
    else:
      h_BxLxF = nn.gelu(fc_in(x_BxLxD))
    out_BxLxD = _dense(cfg, cfg.d_model, 'fc_out')(h_BxLxF)
    return nn.Dropout(cfg.dropout_rate)(out_BxLxD, deterministic=deterministic)


class Block(nn.Module):
  """One Transformer block.

  PreLN:  h = x + s * Attn(LN1(x));   out = h + s * FFN(LN2(h))
  PostLN: h = LN1(x + s * Attn(x));   out = LN2(h + s * FFN(h))
  with s = `residual_scale` (1 unless a method rescales the sublayers).
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD, residual_scale=1.0, deterministic: bool = True,
               key_mask_BxL=None):
    cfg = self.cfg
    ln1 = _layer_norm(cfg, 'ln1')
    ln2 = _layer_norm(cfg, 'ln2')
    attn = Attention(cfg, name='attn')
    mlp = MLP(cfg, name='mlp')
    scale = jnp.asarray(residual_scale, cfg.dtype)
    if cfg.pre_ln:
      h_BxLxD = x_BxLxD + scale * attn(ln1(x_BxLxD), deterministic, key_mask_BxL)
      return h_BxLxD + scale * mlp(ln2(h_BxLxD), deterministic)
    h_BxLxD = ln1(x_BxLxD + scale * attn(x_BxLxD, deterministic, key_mask_BxL))
    return ln2(h_BxLxD + scale * mlp(h_BxLxD, deterministic))


def _split_layers(layers, count: int) -> list:
  """[count, ...] leaves -> `count` trees of their slices. lax.split, whose transpose is one
  concatenate (indexing a[j] would transpose to `count` zero-padded copies, summed)."""
  leaves, treedef = jax.tree.flatten(layers)
  parts = [lax.split(a, [1] * count, axis=0) for a in leaves]
  return [treedef.unflatten([p[j][0] for p in parts]) for j in range(count)]


class _ScanBody(nn.Module):
  """One scan step: a block; carries x."""
  cfg: TransformerConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x, key_mask_BxL):
    return Block(self.cfg, name='block')(x, 1.0, self.deterministic, key_mask_BxL), None


class _Unrolled(nn.Module):
  """Blocks `names` run one after another (a Python loop: no device-side control flow),
  block j with its sublayers scaled by scales_N[j] (None: 1). Their parameters come from
  `BlockStack`'s variable map, one tree per name."""
  cfg: TransformerConfig
  names: tuple[str, ...]
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxD, scales_N, key_mask_BxL):
    cfg = self.cfg
    block_cls = (nn.remat(Block, static_argnums=(3,), policy=REMAT_POLICIES[cfg.remat_policy])
                 if cfg.remat else Block)
    for j, name in enumerate(self.names):
      scale = 1.0 if scales_N is None else scales_N[j]
      x_BxLxD = block_cls(cfg, name=name)(x_BxLxD, scale, self.deterministic, key_mask_BxL)
    return x_BxLxD


class BlockStack(nn.Module):
  """`num_layers` blocks with stacked parameters: params['layers']['block'], every leaf
  [num_layers, ...] (created by the scanned stack, whichever way the blocks then run).

  - scan_layers: one `nn.scan` over the layer axis.
  - otherwise unrolled: block l takes its slice l of the stacked leaves (module names
    'layers/block_{l}').
  - layer dropping (`layer_ids_N`, int32 [N], sorted and distinct, with their keep
    probabilities `keep_probs_N`): only the N kept blocks run, unrolled: kept block j is
    layer layer_ids_N[j], its parameters gathered from the stacked leaves by that index
    (the ids are data, so one program serves every kept set of size N), its sublayers
    scaled by 1 / keep_probs_N[j] (papers.md section 2); module names 'layers/kept_{j}'.
    N = num_layers means ids 0..L-1: the leaves are sliced without a gather. The dropped
    blocks' parameters get a zero gradient. No cond, switch, scan or while: on XLA:GPU each
    of those waits for the host (design.md).
  The unrolled blocks run under `nn.map_variables`, which maps the stacked leaves to one
  tree per block without a JAX transform: their layers are in the caller's trace.
  """
  cfg: TransformerConfig
  num_layers: int

  @nn.compact
  def __call__(self, x_BxLxD, layer_ids_N=None, keep_probs_N=None,
               deterministic: bool = True, key_mask_BxL=None):
    cfg = self.cfg
    if self.is_initializing() or cfg.scan_layers:
      if layer_ids_N is not None and not self.is_initializing():
        raise ValueError('layer dropping runs the kept blocks unrolled; '
                         'scan_layers must be False')
      body = _ScanBody
      if cfg.remat:
        body = nn.remat(body, prevent_cse=False, static_argnums=(),
                        policy=REMAT_POLICIES[cfg.remat_policy])
      scanned = nn.scan(body, variable_axes={'params': 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=nn.broadcast, length=self.num_layers)
      x_BxLxD, _ = scanned(cfg, deterministic, name='layers')(x_BxLxD, key_mask_BxL)
      return x_BxLxD
    if layer_ids_N is None:
      names = tuple(f'block_{l}' for l in range(self.num_layers))
      scales_N = None
    else:
      names = tuple(f'kept_{j}' for j in range(layer_ids_N.shape[0]))
      scales_N = 1.0 / keep_probs_N.astype(jnp.float32)
    num_layers = self.num_layers

    def per_block(variables):
      layers = variables['params']['block']
      if len(names) < num_layers:       # the kept layers' slices, by their ids
        layers = jax.tree.map(
            lambda a: a.at[layer_ids_N].get(mode='promise_in_bounds', unique_indices=True,
                                            indices_are_sorted=True), layers)
      trees = _split_layers(layers, len(names)) if names else []
      return {**variables, 'params': dict(zip(names, trees))}

    unrolled = nn.map_variables(_Unrolled, 'params', trans_in_fn=per_block, mutable=False)
    return unrolled(cfg, names, deterministic, name='layers')(x_BxLxD, scales_N, key_mask_BxL)


class TransformerLM(nn.Module):
  """Decoder-only (causal) or encoder (bidirectional) Transformer with tied embeddings.

  logits = LN_f(Blocks(E[tokens] + P[positions])) @ E^T  (LN_f only for PreLN), returned in
  the compute dtype: losses take them to float32 inside their own fusion.
  """
  cfg: TransformerConfig

  def setup(self):
    cfg = self.cfg
    self.token_embed = nn.Embed(cfg.vocab_size, cfg.d_model,
                                embedding_init=nn.initializers.normal(0.02))
    self.pos_embed = self.param('pos_embed', nn.initializers.normal(0.01),
                                (cfg.max_len, cfg.d_model))
    self.stack = BlockStack(cfg, cfg.num_layers)
    self.final_ln = _layer_norm(cfg) if cfg.pre_ln else None
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def embed(self, tokens_BxL, deterministic: bool = True):
    b, l = tokens_BxL.shape
    if self.cfg.position_lookup == 'gather':
      positions_BxL = lax.broadcasted_iota(jnp.int32, (b, l), 1)
      x_BxLxD = self.token_embed(tokens_BxL) + jnp.take(self.pos_embed, positions_BxL, axis=0)
    else:
      x_BxLxD = self.token_embed(tokens_BxL) + self.pos_embed[:l]
    return self.dropout(x_BxLxD.astype(self.cfg.dtype), deterministic=deterministic)

  def logits(self, x_BxLxD):
    if self.final_ln is not None:
      x_BxLxD = self.final_ln(x_BxLxD)
    table_VxD = self.token_embed.embedding.astype(self.cfg.dtype)
    logits_BxLxV = self.cfg.head_dot_general(
        x_BxLxD, table_VxD, (((2,), (1,)), ((), ())))
    return logits_BxLxV   # compute dtype; losses upcast (a float32 copy of BxLxV is costly)

  def features(self, tokens_BxL, *, train: bool = False, layer_ids_N=None, keep_probs_N=None,
               key_mask_BxL=None):
    """Final hidden states (before the final LayerNorm)."""
    x_BxLxD = self.embed(tokens_BxL, deterministic=not train)
    return self.stack(x_BxLxD, layer_ids_N, keep_probs_N, deterministic=not train,
                      key_mask_BxL=key_mask_BxL)

  def __call__(self, tokens_BxL, *, train: bool = False, layer_ids_N=None, keep_probs_N=None):
    return self.logits(self.features(tokens_BxL, train=train, layer_ids_N=layer_ids_N,
                                     keep_probs_N=keep_probs_N))
