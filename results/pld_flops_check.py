"""One-off check behind results/pld_flops_gpu.md: XLA's FLOPs of PLD programs, compiled vs lowered, fresh
compile vs read from the persistent cache. Usage: python results/pld_flops_check.py CACHE_DIR PRESET"""
import json, sys, time
import jax, numpy as np
from accel import layerdrop, train
from accel.data import input_pipeline
from accel.programs import use_compilation_cache
from experiments import bench_layerdrop

cache, preset = sys.argv[1], sys.argv[2]
use_compilation_cache(cache)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
out = {}
for pld in (False, True):
  c = bench_layerdrop.make_config(preset, 100, pld)
  data = input_pipeline.build(c)
  task, trainer = train.build(c, data.info)
  batch = jax.device_put(data.train(0), trainer.batch_sharding)
  state = trainer.init(jax.random.key(0), batch)
  L = c.model.num_layers
  plans = {'baseline': {}} if not pld else {
      f'N={n}': layerdrop.plan_arrays(np.arange(L) < n, np.ones(L, np.float32))
      for n in ((3 * L) // 4, L // 2)}
  for name, kw in plans.items():
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), kw)
    t0 = time.perf_counter()
    lowered = trainer.train_step.lower(state, batch, abstract)
    compiled = lowered.compile()
    ca = compiled.cost_analysis(); ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    la = lowered.cost_analysis()
    out[name] = {'lowered': (la or {}).get('flops'), 'compiled': (ca or {}).get('flops'),
                 'seconds': time.perf_counter() - t0}
    print(name, out[name], flush=True)
print(json.dumps(out))
