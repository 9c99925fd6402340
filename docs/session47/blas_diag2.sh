export PYTHONPATH=/tmp/site:$PWD
ls /tmp/site >/dev/null 2>&1 || bash scripts/gpu_check.sh none >/dev/null 2>&1
T=tests/runtime/test_gpu_runtimes.py::test_graph_pools_hold_no_blas_workspace
for m in pcg bcg full; do timeout 60 python3 -m pytest -m gpu -q -p no:warnings -p no:cacheprovider "$T[$m]" 2>&1 | tail -1; done
