# sourced by the scripts here: gptqmodel from the carried wheels, this tree on the path
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuwheels/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_CPU_WORKERS=8
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi -L
