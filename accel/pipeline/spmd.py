"""The Ouroboros pipeline as one jitted SPMD program over a ('data', 'stage') mesh.

One call of `Pipeline.step` is one iteration t of the algorithm in `accel.pipeline`'s
docstring, for every stage at once, inside `jax.shard_map`:

  1. every stage runs its own modules (`lax.switch` on its stage index: tied-ring stage 0
     runs module 0 and module K-1, other stages one module): the forward of the newest
     batch that reached it, and a local jax.vjp for the backward of an older batch;
  2. `lax.ppermute` sends the forward outputs to the next stage and the input-gradients
     to the previous one (ring S-1 -> 0 in the tied layout); they arrive as next
     iteration's inboxes;
  3. gradients are averaged over 'data' (`pmean`), clipped by the global norm of all
     stages' gradients if clip_norm > 0 (`accel.pipeline.clipping`), and each module
     applies its own Adam, only where it has a gradient (warm-up; `jnp.where` keeps the
     old state otherwise).

Dropout: module j's forward of batch b, and its backward of b (re-run or rebuilt from the
stored residuals: the masks are re-derived from the key), use the key
`pieces.dropout_key(rng, b, j, lax.axis_index('data'))`: each data shard draws its own
masks, so the masks depend on the mesh; with a data axis of 1 they are the reference's.

State, every array with a leading stage axis S (sharded over 'stage'; the batch axes over
'data'):
  params   layers [S, n, ...] (stage-major stack, `Layout`), E [S, V, D], first / last
           (module 0's / module K-1's own parameters, `families`: the position table;
           the final LN and Transformer-XL's output bias) [S, ...]; E / first / last are
           zeros on stages that do not own them.
  opt      optimizer state per layer (vmap over n: each layer counts its own updates,
           which equals per-module Adam since Adam is elementwise) and per owned tensor.
  act_in, grad_in   [S, B, L, D]: the messages received at the end of the last iteration.
  hist     [S, R, ...], R = 2(K-1): ring over the batches of the stage's delayed module,
           slot b mod R for batch b; module j writes batch t-j and reads batch t-2(K-1)+j,
           d_j = 2(K-1-j) <= R iterations apart. What a slot holds:
           'recompute': the module's block input [B, L, D] (module 0: none needed, it
             re-embeds its tokens);
           'stored': the residuals of the module's jax.vjp as its forward ran (the Dense
             outputs, the block inputs and the weights, `_block_vjp`), packed into one
             float32 vector of the largest role's size (`_residual_size`). The backward
             rebuilds the vjp from them: no second pass through the Dense layers. The
             dropout key, the one residual that is not packed, is derived again.
  tokens   inputs/targets [2K-1, B, L], replicated over 'stage': module 0 re-embeds batch
           t-2(K-1) ('recompute') and module K-1 reads the targets of batch t-(K-1).
  mem      (models with a recurrence memory) [S, n, B, M, D]: each stage the memory of
           its own layers, advanced by each module's forward of a real batch (t - j >= 0).
  hist_mem ('recompute' with a memory) [S, R, n, B, M, D]: the stage memory at the
           forward of the batch in slot b mod R, i.e. what its delayed re-run must read.
Memory beyond the weights, per stage: 2 B L D inboxes plus R B L D history ('recompute',
and one extra forward per backward) or R residual sets ('stored': about 11 B L D per
block plus the stage's weights); with a recurrence memory also n B M D live memory and,
for 'recompute', R n B M D of memory history (in 'stored' it is in the residual sets).

All of this is plain static-shape state: checkpointing it checkpoints the pipeline.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from accel.pipeline import clipping, families, pieces
from accel.pipeline.layout import Layout

_tmap = jax.tree_util.tree_map


def make_mesh(data: int, stage: int, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'stage') mesh with Auto axes."""
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, stage), ('data', 'stage'), (auto, auto), devices=devices)


def _block_vjp(mp, layers, x, mem, key=None):
  """jax.vjp (in layers and x; has_aux: the new memory) of a module's blocks whose residuals
  are the Dense outputs (and the inputs, the memory read, the weights and the dropout key):
  the attention scores, dropout masks and elementwise intermediates are re-derived from
  them in the backward, deterministically, so the backward is still that of the forward
  as it ran. Returns (y, vjp, new_mem).
  """
  blocks = jax.checkpoint(mp.blocks,
                          policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return jax.vjp(lambda l, x_: blocks(l, x_, mem, key), layers, x, has_aux=True)


def _is_key(a) -> bool:
  return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def _packed_leaves(vjp):
  """The residuals of a jax.vjp that `_pack` stores: all but the dropout key."""
  return [a for a in jax.tree_util.tree_leaves(vjp) if not _is_key(a)]


def _pack(vjp, size: int):
  """The residual leaves of a jax.vjp, as one float32 vector padded to `size`."""
  leaves = [a.astype(jnp.float32).ravel() for a in _packed_leaves(vjp)]
  flat = jnp.concatenate(leaves) if leaves else jnp.zeros((0,), jnp.float32)
  return jnp.pad(flat, (0, size - flat.shape[0]))


def _unpack(flat, template):
  """A vjp with `template`'s structure whose residuals are read back from `flat`.

  The template is a fresh jax.vjp of the same function on arrays of the same shapes; only
  its structure is used, so XLA drops the forward it traced. Its dropout key is kept: the
  template is built with the key of the batch being back-propagated, which is the key
  its forward ran with (`pieces.dropout_key` of batch and module).
  """
  leaves, treedef = jax.tree_util.tree_flatten(template)
  out, offset = [], 0
  for a in leaves:
    if _is_key(a):
      out.append(a)
      continue
    out.append(flat[offset:offset + a.size].reshape(a.shape).astype(a.dtype))
    offset += a.size
  return jax.tree_util.tree_unflatten(treedef, out)


class Pipeline:
  """Ouroboros over `mesh` (mesh.shape['stage'] must equal layout.num_stages)."""

  def __init__(self, cfg, layout: Layout, tx: optax.GradientTransformation,
               backward_weights: str, mesh: jax.sharding.Mesh, rng=None,
               clip_norm: float = 0.0):
    """rng: the train rng the dropout keys derive from (needed if cfg.dropout_rate > 0);
    clip_norm: c of `accel.pipeline.clipping` (0: no clipping); tx must not clip."""
    if backward_weights not in ('stored', 'recompute'):
      raise ValueError(f'backward_weights={backward_weights!r}')
    if mesh.shape['stage'] != layout.num_stages:
      raise ValueError(f"mesh has {mesh.shape['stage']} stages, layout needs "
                       f'{layout.num_stages}')
    if cfg.dropout_rate and rng is None:
      raise ValueError('dropout_rate > 0 needs the rng its masks derive from')
    self.model_pieces = families.for_config(cfg)
    self.cfg = self.model_pieces.cfg
    self.layout, self.tx, self.mesh = layout, tx, mesh
    self.rng = rng if cfg.dropout_rate else None
    self.clip_norm = clip_norm
    self.stored = backward_weights == 'stored'
    k, s, n = layout.num_modules, layout.num_stages, layout.layers_per_stage
    self._R = 2 * (k - 1)
    # Static per-stage tables: module of each local layer; owners of E / first / last.
    if layout.tied_ring:
      mods = [[k - 1] * layout.n_last + [0] * layout.n_first] + [[j] * n for j in range(1, s)]
    else:
      mods = [[j] * n for j in range(s)]
    self._layer_module = np.asarray(mods, np.int32)                      # [S, n]
    last = layout.stage_of(k - 1)
    self._owns_first = np.arange(s) == 0
    self._owns_last = np.arange(s) == last
    self._owns_E = self._owns_first | self._owns_last
    self._counts_E = self._owns_last    # E's summed gradient enters the clip norm once
    # The module each stage back-propagates with a delay (-1: none, untied last stage).
    self._delayed = np.asarray([j if j != k - 1 else -1 for j in range(s)]
                               if not layout.tied_ring else list(range(s)), np.int32)
    # The shard_mapped iteration, to be jitted here or inside a caller's jit.
    self.step_fn = self._build_step()
    self._step = jax.jit(self.step_fn, donate_argnums=0)

  # ----------------------------------------------------------------------------- layout
  def _stack(self, params):
    """Model params -> stage-stacked params (zeros where not owned)."""
    lay, s = self.layout, self.layout.num_stages
    parts = self.model_pieces.split(params)
    own = lambda mask, tree: _tmap(
        lambda a: jnp.stack([a if m else jnp.zeros_like(a) for m in mask]), tree)
    layers = _tmap(lambda a: jnp.roll(a, lay.roll, axis=0).reshape(s, lay.layers_per_stage,
                                                                   *a.shape[1:]),
                   parts['layers'])
    return {'layers': layers, 'E': own(self._owns_E, parts['E']),
            'first': own(self._owns_first, parts['first']),
            'last': own(self._owns_last, parts['last'])}

  def model_params(self, state):
    """Stage-stacked params -> the model's params."""
    p, lay = state['params'], self.layout
    layers = _tmap(lambda a: jnp.roll(a.reshape(lay.num_layers, *a.shape[2:]), -lay.roll, 0),
                   p['layers'])
    last = lay.stage_of(lay.num_modules - 1)
    return self.model_pieces.join(p['E'][0], _tmap(lambda a: a[0], p['first']), layers,
                                  _tmap(lambda a: a[last], p['last']))

  def _specs(self):
    st, dt = P('stage'), P('stage', 'data')
    specs = {'step': P(), 'params': st, 'opt': st, 'act_in': dt, 'grad_in': dt,
             'hist': P('stage', None, 'data'), 'tokens': P(None, 'data')}
    if self.model_pieces.has_memory:
      specs['mem'] = P('stage', None, 'data')
      if not self.stored:
        specs['hist_mem'] = P('stage', None, None, 'data')
    return specs

  def init(self, params, batch_size: int, seq_len: int):
    """Pipeline state for the model's `params`; batch_size is the global batch."""
    cfg, s, r = self.cfg, self.layout.num_stages, self._R
    stacked = self._stack(params)
    init_layers = jax.vmap(jax.vmap(self.tx.init))
    init_owned = jax.vmap(self.tx.init, axis_size=s)   # axis_size: 'first' may be {}
    x = lambda: jnp.zeros((s, batch_size, seq_len, cfg.d_model), cfg.dtype)
    tok = lambda: jnp.zeros((2 * self.layout.num_modules - 1, batch_size, seq_len), jnp.int32)
    state = {'step': jnp.zeros((), jnp.int32), 'params': stacked,
             'opt': {'layers': init_layers(stacked['layers']), 'E': init_owned(stacked['E']),
                     'first': init_owned(stacked['first']), 'last': init_owned(stacked['last'])},
             'act_in': x(), 'grad_in': x(), 'tokens': {'inputs': tok(), 'targets': tok()}}
    mem = self.model_pieces.zero_memory(self.layout.layers_per_stage, batch_size)
    if mem is not None:    # [S, n, B, M, D]: each stage the memory of its own layers
      state['mem'] = jnp.stack([mem] * s)
    if self.stored:
      data = self.mesh.shape['data']
      size = self._residual_size(stacked['layers'], batch_size // data, seq_len)
      state['hist'] = jnp.zeros((s, r, data * size), jnp.float32)
    else:
      state['hist'] = jnp.zeros((s, r, batch_size, seq_len, cfg.d_model), cfg.dtype)
      if mem is not None:  # the memory each delayed batch read, for its re-run forward
        state['hist_mem'] = jnp.zeros((s, r, *mem.shape), mem.dtype)
    return jax.device_put(state, self.shardings(state))

  def _residual_size(self, layers_SxN, local_batch: int, seq_len: int) -> int:
    """Floats in the largest packed vjp residual set of any stage's delayed module.

    Traced under the same shard_map as the step (weights varying over 'data', memory over
    both axes), because the residual list depends on it (a few scalar residuals appear
    there).
    """
    lay, cfg, mp, sizes = self.layout, self.cfg, self.model_pieces, [0]

    def probe(layers, x):
      layers = _tmap(lambda a: lax.pcast(a[0], 'data', to='varying'), layers)
      me = lax.axis_index('stage')   # a key varying over both axes, as in the step
      for count in {lay.n_first, lay.layers_per_stage}:
        mem = _tmap(lambda a: lax.pcast(a, ('data', 'stage'), to='varying'),
                    mp.zero_memory(count, local_batch))
        vjp = _block_vjp(mp, pieces.slice_layers(layers, 0, count), x[0], mem,
                         self._dropout_key(me, me))[1]
        sizes.append(sum(a.size for a in _packed_leaves(vjp)))
      return x

    data, s = self.mesh.shape['data'], lay.num_stages
    x = jax.ShapeDtypeStruct((s, data * local_batch, seq_len, cfg.d_model), cfg.dtype)
    jax.eval_shape(jax.shard_map(probe, mesh=self.mesh, in_specs=(P('stage'), P('stage', 'data')),
                                 out_specs=P('stage', 'data')), layers_SxN, x)
    return max(sizes)

  def _dropout_key(self, batch, module):
    """Inside the shard_map: module's key for batch on this data shard (None: no dropout)."""
    return pieces.dropout_key(self.rng, batch, module, lax.axis_index('data'))

  def shardings(self, state):
    specs = self._specs()
    return {key: _tmap(lambda _: NamedSharding(self.mesh, specs[key]), v)
            for key, v in state.items()}

  def step(self, state, batch):
    """One iteration; batch = dict(inputs, targets) [B, L] int32, sharded over 'data'.

    Returns (state, metrics): metrics['loss'] is the loss of batch t-(K-1),
    metrics['loss_valid'] whether that batch exists (false while the pipeline fills) and
    metrics['grad_norm'] the global norm of the gradients applied, before clipping.
    """
    batch = jax.device_put(batch, NamedSharding(self.mesh, P('data')))
    return self._step(state, batch)

  # ------------------------------------------------------------------------- the step
  def _build_step(self):
    lay, tx, mp, clip_norm = self.layout, self.tx, self.model_pieces, self.clip_norm
    k, s, r = lay.num_modules, lay.num_stages, self._R
    n_last = lay.n_last
    stored = self.stored
    rt = 2 * k - 1   # token ring: batches t-2(K-1) .. t

    def blocks_vjp(layers, x, mem, g, key):
      return _block_vjp(mp, layers, x, mem, key)[1](g)

    def embed_vjp(E, first, tok, g, key):
      _, vjp = jax.vjp(lambda e, f: mp.embed(e, f, tok, key), E, first)
      return vjp(g)

    def module_fwd(layers, x, mem, size, key):
      """Forward of a delayed module: (output, what its history slot keeps, new memory)."""
      if stored:
        y, vjp, new_mem = _block_vjp(mp, layers, x, mem, key)
        return y, _pack(vjp, size), new_mem
      y, new_mem = mp.blocks(layers, x, mem, key)
      return y, x, new_mem

    def module_bwd(layers, x_shape_like, mem_b, hist_b, g, key):
      """Delayed backward through the stored forward, or a forward re-run on w^t with the
      memory batch b read ('stored': mem_b only gives the template its shapes)."""
      if stored:
        template = _block_vjp(mp, layers, jnp.zeros_like(x_shape_like), mem_b, key)[1]
        return _unpack(hist_b, template)(g)
      return blocks_vjp(layers, hist_b, mem_b, g, key)

    def first_fwd(p, layers0, mem0, io):
      """Module 0 forward of batch t: (output y to send, history entry, new memory)."""
      x0 = mp.embed(p['E'], p['first'], io['tok_now'], io['key_now'])
      return module_fwd(layers0, x0, mem0, io['hist_b'].shape[0] if stored else None,
                        io['key_now'])

    def first_bwd(p, layers0, mem0_b, io):
      """Module 0 backward of batch t-2(K-1): grads of its blocks, E (input side), first."""
      g, key = io['grad_in'], io['key_b']
      if stored:
        g_layers, g_x0 = module_bwd(layers0, g, mem0_b, io['hist_b'], g, key)
      else:   # Features Replay: re-embed the stored tokens with the current weights
        x0_b = mp.embed(p['E'], p['first'], io['tok_b'], key)
        g_layers, g_x0 = blocks_vjp(layers0, x0_b, mem0_b, g, key)
      g_E, g_first = embed_vjp(p['E'], p['first'], io['tok_b'], g_x0, key)
      # The input-side part of E joins the output-side one: drop it while batch < 0.
      g_E = jnp.where(io['t'] >= 2 * (k - 1), g_E, 0.0)
      return g_layers, g_E, g_first

    def last(p, layers_last, mem_last, io):
      """Module K-1: forward, loss and backward of batch t-(K-1).

      Returns (loss, new memory, grads of (layers, E, last, input))."""
      def loss_fn(l, e, f, x):
        h, new_mem = mp.blocks(l, x, mem_last, io['key_last'])
        return mp.head_loss(e, f, h, io['targets'], io['key_last']), new_mem
      (loss, new_mem), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True)(
          layers_last, p['E'], p['last'], io['act_in'])
      return loss, new_mem, grads

    zeros_like = lambda t: _tmap(jnp.zeros_like, t)

    def varying(tree):
      """Marks every leaf as varying over both mesh axes, so switch branches agree."""
      def cast(a):
        have = jax.typeof(a).manual_axis_type.varying
        missing = tuple(ax for ax in ('data', 'stage') if ax not in have)
        return lax.pcast(a, missing, to='varying') if missing else a
      return _tmap(cast, tree)

    def bwd_out(p, send_grad, loss, mem, layers=None, E=None, first=None, last=None):
      g = {'layers': layers if layers is not None else zeros_like(p['layers']),
           'E': E if E is not None else jnp.zeros_like(p['E']),
           'first': first if first is not None else zeros_like(p['first']),
           'last': last if last is not None else zeros_like(p['last'])}
      return varying((send_grad, loss, g, mem))

    no_loss = lambda: jnp.zeros((), jnp.float32)
    n = lay.layers_per_stage
    # Tied ring stage 0 stacks [module K-1 | module 0] (layers and memory alike).
    mod0 = lambda t: pieces.slice_layers(t, n_last, n) if lay.tied_ring else t
    modl = lambda t: pieces.slice_layers(t, 0, n_last) if lay.tied_ring else t
    with_mod0 = lambda t, new0: pieces.concat_layers([modl(t), new0]) if lay.tied_ring else new0
    with_modl = lambda t, newl: pieces.concat_layers([newl, mod0(t)]) if lay.tied_ring else newl

    # Backward branches (they read only the inboxes, the history and the memory):
    # (send_grad, loss, g, stage memory with the loss module's part advanced).
    def ring0_bwd(p, io):   # tied ring stage 0: module K-1 = layers[:n_last], module 0
      g0, gE_in, g_first = first_bwd(p, mod0(p['layers']), mod0(io['mem_b']), io)
      loss, new_mem_l, (g_last, gE_out, g_head, dx) = last(p, modl(p['layers']),
                                                           modl(io['mem']), io)
      g_layers = pieces.concat_layers([g_last, g0])
      return bwd_out(p, dx, loss, with_modl(io['mem'], new_mem_l), g_layers, gE_out + gE_in,
                     g_first, g_head)

    def first_only_bwd(p, io):
      g0, gE_in, g_first = first_bwd(p, p['layers'], io['mem_b'], io)
      return bwd_out(p, jnp.zeros_like(io['grad_in']), no_loss(), io['mem'], g0, gE_in,
                     g_first)

    def middle_bwd(p, io):
      g_layers, dx = module_bwd(p['layers'], io['grad_in'], io['mem_b'], io['hist_b'],
                                io['grad_in'], io['key_b'])
      return bwd_out(p, dx, no_loss(), io['mem'], g_layers)

    def last_only_bwd(p, io):
      loss, new_mem, (g_l, gE_out, g_head, dx) = last(p, p['layers'], io['mem'], io)
      return bwd_out(p, dx, loss, new_mem, g_l, gE_out, None, g_head)

    # Forward branches, given the memory after the backward branch:
    # (send_act, history entry, stage memory with the delayed module's part advanced).
    def first_fwd_branch(p, io, mem):
      y, entry, new_mem0 = first_fwd(p, mod0(p['layers']), mod0(mem), io)
      return varying((y, entry, with_mod0(mem, new_mem0)))

    def middle_fwd(p, io, mem):
      return varying(module_fwd(p['layers'], io['act_in'], mem,
                                io['hist_b'].shape[0] if stored else None, io['key_now']))

    def last_only_fwd(p, io, mem):     # no delayed module: its forward runs in its backward
      return varying((jnp.zeros_like(io['act_in']), jnp.zeros_like(io['hist_b']), mem))

    if lay.tied_ring:
      bwd_branches, fwd_branches = [ring0_bwd, middle_bwd], [first_fwd_branch, middle_fwd]
      roles = [0] + [1] * (s - 1)
    else:
      bwd_branches = [first_only_bwd, middle_bwd, last_only_bwd]
      fwd_branches = [first_fwd_branch, middle_fwd, last_only_fwd]
      roles = [0] + [1] * (k - 2) + [2]
    roles = np.asarray(roles, np.int32)
    fwd_perm = [(i, (i + 1) % s) for i in range(s)] if lay.tied_ring else \
        [(i, i + 1) for i in range(s - 1)]
    bwd_perm = [(i, (i - 1) % s) for i in range(s)] if lay.tied_ring else \
        [(i, i - 1) for i in range(1, s)]
    layer_module = jnp.asarray(self._layer_module)
    owns = {name: jnp.asarray(v) for name, v in
            (('E', self._owns_E), ('first', self._owns_first), ('last', self._owns_last))}
    delayed = jnp.asarray(self._delayed)
    counts_E = jnp.asarray(self._counts_E)
    dropout_key = self._dropout_key

    def keep(mask, new, old):
      return _tmap(lambda a, b: jnp.where(
          mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a, b), new, old)

    def local(state, batch):
      t = state['step']
      me = lax.axis_index('stage')
      sq = lambda tree: _tmap(lambda a: a[0], tree)
      p, opt = sq(state['params']), sq(state['opt'])
      # Per-shard weights (varying over 'data'): each vjp below is then local to its data
      # shard (no implicit psum inside the branches); the one pmean over 'data' follows.
      p_local = _tmap(lambda a: lax.pcast(a, 'data', to='varying'), p)
      hist = state['hist'][0]
      mem = state['mem'][0] if mp.has_memory else None         # [n, B, M, D]
      # Token ring: write batch t, read batches t-(K-1) (targets) and t-2(K-1) (module 0).
      tokens = _tmap(lambda ring, new: lax.dynamic_update_index_in_dim(ring, new, t % rt, 0),
                     state['tokens'], batch)
      j_del = delayed[me]                          # this stage's delayed module
      b_del = t - 2 * (k - 1) + j_del              # batch of its delayed backward
      slot_b = b_del % r
      slot_now = (t - j_del) % r                   # slot of the batch it forwards now
      io = {'t': t, 'tok_now': batch['inputs'],
            'key_now': dropout_key(t - j_del, j_del), 'key_b': dropout_key(b_del, j_del),
            'key_last': dropout_key(t - (k - 1), k - 1),
            'tok_b': lax.dynamic_index_in_dim(tokens['inputs'], (t + 1) % rt, 0, False),
            'targets': lax.dynamic_index_in_dim(tokens['targets'], (t + k) % rt, 0, False),
            'hist_b': lax.dynamic_index_in_dim(hist, slot_b, 0, False),
            'act_in': state['act_in'][0], 'grad_in': state['grad_in'][0], 'mem': mem,
            # the memory batch b_del read ('stored': in its residuals; this is a template)
            'mem_b': (lax.dynamic_index_in_dim(state['hist_mem'][0], slot_b, 0, False)
                      if 'hist_mem' in state else mem)}
      role = jnp.asarray(roles)[me]
      # Backward first, then forward: each ppermute can overlap the other half's compute.
      send_grad, loss, g, mem_bwd = lax.switch(role, bwd_branches, p_local, io)
      new_grad = lax.ppermute(send_grad, 'stage', bwd_perm)
      send_act, entry, mem_fwd = lax.switch(role, fwd_branches, p_local, io, mem_bwd)
      new_act = lax.ppermute(send_act, 'stage', fwd_perm)
      if not lay.tied_ring:   # the two copies of E add each other's part
        g['E'] = g['E'] + lax.ppermute(g['E'], 'stage', [(0, k - 1), (k - 1, 0)])
      g = lax.pmean(g, 'data')
      # Which parts have a gradient at iteration t (module j: batch t-2(K-1)+j >= 0).
      layer_valid = t - 2 * (k - 1) + layer_module[me] >= 0               # [n]
      loss_valid = t >= k - 1
      valid = {'E': owns['E'][me] & loss_valid, 'first': owns['first'][me] & (t >= 2 * (k - 1)),
               'last': owns['last'][me] & loss_valid}
      # Global norm of what is applied at t: each tensor with a gradient, counted once.
      sq_layers_N = jax.vmap(lambda a: optax.tree.norm(a, squared=True))(g['layers'])
      sq_norm = jnp.sum(jnp.where(layer_valid, sq_layers_N, 0.0))
      for name, counted in (('E', counts_E[me] & loss_valid), ('first', valid['first']),
                            ('last', valid['last'])):
        sq_norm += jnp.where(counted, optax.tree.norm(g[name], squared=True), 0.0)
      grad_norm = jnp.sqrt(lax.psum(sq_norm, 'stage'))
      if clip_norm:
        g = clipping.clip(g, grad_norm, clip_norm)

      def adam(grads, o, params):
        updates, o = tx.update(grads, o, params)
        return optax.apply_updates(params, updates), o

      new_p, new_opt = {}, {}
      lp, lo = jax.vmap(adam)(g['layers'], opt['layers'], p['layers'])
      new_p['layers'] = keep(layer_valid, lp, p['layers'])
      new_opt['layers'] = keep(layer_valid, lo, opt['layers'])
      for name in ('E', 'first', 'last'):
        np_, no = adam(g[name], opt[name], p[name])
        new_p[name] = keep(valid[name], np_, p[name])
        new_opt[name] = keep(valid[name], no, opt[name])
      ex = lambda tree: _tmap(lambda a: a[None], tree)
      new_state = {'step': t + 1, 'params': ex(new_p), 'opt': ex(new_opt),
                   'act_in': new_act[None], 'grad_in': new_grad[None],
                   'hist': lax.dynamic_update_index_in_dim(hist, entry, slot_now, 0)[None],
                   'tokens': tokens}
      if mp.has_memory:
        # A layer's memory advances only with a real batch (module j: batch t-j >= 0).
        new_state['mem'] = keep(t - layer_module[me] >= 0, mem_fwd, mem)[None]
      if 'hist_mem' in state:
        new_state['hist_mem'] = lax.dynamic_update_index_in_dim(
            state['hist_mem'][0], mem, slot_now, 0)[None]
      is_loss_stage = me == lay.stage_of(k - 1)
      loss = lax.pmean(lax.psum(jnp.where(is_loss_stage, loss, 0.0), 'stage'), 'data')
      return new_state, {'loss': loss, 'loss_valid': loss_valid, 'grad_norm': grad_norm}

    specs = self._specs()
    in_specs = (specs, P('data'))
    out_specs = (specs, P())
    return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)
