# sourced by the scripts here: gptqmodel from the carried wheels, this tree on the path
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuwheels/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_CPU_WORKERS=8
export OUT=${OUT:-/tmp/out}
# seconds this script may run (the scripts stop their runs there): under the call's 600 s by default;
# set LIMIT to run several scripts in one call, e.g. LIMIT=150 bash a.sh; LIMIT=420 bash b.sh
LIMIT=${LIMIT:-570}
mkdir -p "$OUT"
nvidia-smi -L
