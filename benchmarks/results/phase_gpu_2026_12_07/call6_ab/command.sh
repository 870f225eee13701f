#!/bin/bash
pip install --no-deps --no-build-isolation -e . -q 2>&1 | grep -v WARN
export PYTHONPATH=$PWD
cp hybrid_jax/_predicted.py /tmp/new.py
sed -e 's/_basis.grouped_matmul(one_step, transport)/jnp.einsum("gb,gbc->gc", one_step, transport)/' -e 's/_basis.grouped_matmul(prop.step_map, prop.transport)/jnp.einsum("gij,gjk->gik", prop.step_map, prop.transport)/' /tmp/new.py > /tmp/old.py
grep -c einsum /tmp/old.py /tmp/new.py
for v in old new old new; do
  cp /tmp/$v.py hybrid_jax/_predicted.py
  echo "== $v"; timeout 62 python benchmarks/phase_host.py --model lm25 --pack --metrics train 2>&1 | grep -v "^W\|^I" | tail -2 | cut -c80-260
done
