# Source on a bare GPU machine (no network): makes `retroinfer` importable from this checkout,
# with Ray from carried wheels when .whl/ is present.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip-e.log 2>&1; then
  # Fallback: the package-dir mapping of pyproject.toml, as symlinks.
  mkdir -p /tmp/rsite/retroinfer
  for f in retroinfer/*; do ln -sfn "$PWD/$f" /tmp/rsite/retroinfer/; done
  ln -sfn "$PWD/kernels" /tmp/rsite/retroinfer/kernels
  ln -sfn "$PWD/cluster" /tmp/rsite/retroinfer/cluster
  ln -sfn "$PWD/deployments" /tmp/rsite/retroinfer/deployments
  export PYTHONPATH=/tmp/rsite${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 -c "import retroinfer.kernels, torch; print('retroinfer ok, torch', torch.__version__)"
