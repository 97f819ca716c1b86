"""Flax linen models, chosen by `config.model.name`.

`build_model(config, info, **overrides)` returns an unbound module. `overrides` are the
numerics hooks a method injects (e.g. `dot_general` from `accel.lowprec`), given to the
model's constructor so the model code never changes per method.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from accel.errors import UserError
from accel.models import adaptive_softmax, cnn, transformer_xl
from accel.models.encoder import MaskedLM, SequenceClassifier
from accel.models.transformer import (POSITION_LOOKUPS, QKV_PROJECTIONS, REMAT_POLICIES,
                                      TransformerConfig,
                                      TransformerLM)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype(name: str):
  if name not in DTYPES:
    raise UserError(f'unknown dtype {name!r}; known: {", ".join(DTYPES)}')
  return DTYPES[name]


def transformer_config(model_cfg, *, vocab_size: int, max_len: int, causal: bool = True,
                       **overrides) -> TransformerConfig:
  """TransformerConfig from a `config.model` block (+ method overrides)."""
  if model_cfg.d_model % model_cfg.num_heads:
    raise UserError(f'model.d_model {model_cfg.d_model} is not divisible by '
                    f'model.num_heads {model_cfg.num_heads}')
  if model_cfg.remat_policy not in REMAT_POLICIES:
    raise UserError(f'unknown model.remat_policy {model_cfg.remat_policy!r}; known: '
                    f'{", ".join(repr(p) for p in REMAT_POLICIES)}')
  if model_cfg.qkv_projection not in QKV_PROJECTIONS:
    raise UserError(f'unknown model.qkv_projection {model_cfg.qkv_projection!r}; known: '
                    f'{", ".join(QKV_PROJECTIONS)}')
  if model_cfg.position_lookup not in POSITION_LOOKUPS:
    raise UserError(f'unknown model.position_lookup {model_cfg.position_lookup!r}; known: '
                    f'{", ".join(POSITION_LOOKUPS)}')
  return TransformerConfig(
      vocab_size=vocab_size, num_layers=model_cfg.num_layers, d_model=model_cfg.d_model,
      num_heads=model_cfg.num_heads, d_ff=model_cfg.d_ff, max_len=max_len,
      dropout_rate=model_cfg.dropout_rate, pre_ln=model_cfg.pre_ln, causal=causal,
      dtype=dtype(model_cfg.dtype), scan_layers=model_cfg.scan_layers,
      remat=model_cfg.remat, remat_policy=model_cfg.remat_policy, use_bias=model_cfg.use_bias,
      qkv_projection=model_cfg.qkv_projection, gelu_recompute=model_cfg.gelu_recompute,
      position_lookup=model_cfg.position_lookup,
      attention_impl=model_cfg.attention_impl or None, **overrides)


def _transformer_lm(config, info, **overrides):
  return TransformerLM(transformer_config(
      config.model, vocab_size=info.vocab_size, max_len=config.data.seq_len, **overrides))


def _image_classifier(config, info, **overrides):
  """cnn | mlp | resnet of accel/models/cnn.py, normalization by config.model.norm."""
  if info.kind != 'image':
    raise UserError(f'model.name {config.model.name!r} classifies images; data.name '
                    f'{config.data.name!r} is {info.kind!r} data')
  m = config.model
  if m.norm not in cnn.NORMS:
    raise UserError(f'model.norm must be one of {", ".join(cnn.NORMS)}, got {m.norm!r}')
  kwargs = dict(depth=m.depth, width=m.width) if m.name == 'resnet' else {}
  return cnn.MODELS[m.name](num_classes=info.num_classes, norm=m.norm,
                            num_groups=m.num_groups, **kwargs, **overrides)


def _bert(config, info, **overrides):
  """Bidirectional encoder: masked LM on text, [CLS] classifier on text classification."""
  cfg = transformer_config(config.model, vocab_size=info.vocab.size,
                           max_len=config.data.seq_len, causal=False, **overrides)
  if info.kind == 'text_classification':       # num_classes 1: a regression (STS-B)
    return SequenceClassifier(cfg, info.num_classes, pad_id=info.vocab.pad)
  return MaskedLM(cfg)


def _transformer_xl(config, info, **overrides):
  """Transformer-XL (accel/models/transformer_xl.py); memory length `model.mem_len`."""
  m = config.model
  if m.d_model % m.num_heads:
    raise UserError(f'model.d_model {m.d_model} is not divisible by model.num_heads '
                    f'{m.num_heads}')
  cutoffs = adaptive_softmax.check_cutoffs(m.get('adaptive_cutoffs', ()), info.vocab_size)
  return transformer_xl.TransformerXL(transformer_xl.TransformerXLConfig(
      vocab_size=info.vocab_size, num_layers=m.num_layers, d_model=m.d_model,
      num_heads=m.num_heads, d_ff=m.d_ff, mem_len=m.mem_len, dropout_rate=m.dropout_rate,
      pre_ln=m.pre_ln, dtype=dtype(m.dtype), adaptive_cutoffs=cutoffs, **overrides))


# name -> builder(config, dataset_info, **overrides) -> nn.Module
MODEL_BUILDERS: dict[str, Callable] = {'transformer_lm': _transformer_lm, 'bert': _bert,
                                       'transformer_xl': _transformer_xl}
MODEL_BUILDERS.update(dict.fromkeys(cnn.MODELS, _image_classifier))


def build_model(config, info, **overrides):
  name = config.model.name
  if name not in MODEL_BUILDERS:
    raise UserError(f'unknown model.name {name!r}; known: {", ".join(sorted(MODEL_BUILDERS))}')
  return MODEL_BUILDERS[name](config, info, **overrides)
