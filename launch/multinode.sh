#!/usr/bin/env bash
# Start launch/train.py on this machine as one node of a multi-node job: torchrun with c10d
# rendezvous. Run the same command on every node, each with its own --node-rank; node 0 hosts
# the rendezvous store at --endpoint, which every node must reach.
#
#   node 0:  launch/multinode.sh --nnodes 2 --node-rank 0 --endpoint 10.1.2.3:29500 -- --strategy fsdp2
#   node 1:  launch/multinode.sh --nnodes 2 --node-rank 1 --endpoint 10.1.2.3:29500 -- --strategy fsdp2
#
# Everything after "--" goes to train.py. Checkpoints (--out) must be on a filesystem every node
# shares. When a node has several interfaces, pick the one the nodes talk over with
# GLOO_SOCKET_IFNAME (CPU) or NCCL_SOCKET_IFNAME (GPU), and give --local-addr when the
# machine's host name does not resolve to the address the other nodes reach it at.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    echo
    echo "options: --nnodes N  --node-rank R  --endpoint HOST:PORT  [--nproc-per-node P (default 1)]"
    echo "         [--rdzv-id ID (default neurooptima)]  [--local-addr ADDR]  [--python PATH]"
}

nnodes="" node_rank="" endpoint="" nproc=1 rdzv_id="neurooptima" local_addr=""
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nnodes) nnodes="$2"; shift 2 ;;
        --node-rank) node_rank="$2"; shift 2 ;;
        --endpoint) endpoint="$2"; shift 2 ;;
        --nproc-per-node) nproc="$2"; shift 2 ;;
        --rdzv-id) rdzv_id="$2"; shift 2 ;;
        --local-addr) local_addr="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "multinode.sh: unknown option $1 (train.py options go after --)" >&2; exit 2 ;;
    esac
done

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
if ! is_int "$nnodes" || [[ "$nnodes" -lt 1 ]]; then
    echo "multinode.sh: --nnodes must be an integer >= 1, got '${nnodes}'" >&2; exit 2
fi
if ! is_int "$node_rank" || [[ "$node_rank" -ge "$nnodes" ]]; then
    echo "multinode.sh: --node-rank must be an integer in [0, $nnodes), got '${node_rank}'" >&2; exit 2
fi
if [[ ! "$endpoint" =~ ^[^:]+:[0-9]+$ ]]; then
    echo "multinode.sh: --endpoint must be HOST:PORT (node 0's address), got '${endpoint}'" >&2; exit 2
fi
if ! is_int "$nproc" || [[ "$nproc" -lt 1 ]]; then
    echo "multinode.sh: --nproc-per-node must be an integer >= 1, got '${nproc}'" >&2; exit 2
fi

# Node 0 hosts the rendezvous store. torchrun would guess that from the endpoint's host name,
# which fails when the address is not the one the machine's host name resolves to.
if [[ "$node_rank" -eq 0 ]]; then is_host=true; else is_host=false; fi
# The address this node's workers are reached at (default: what its host name resolves to).
extra=()
if [[ -n "$local_addr" ]]; then extra+=(--local-addr="$local_addr"); fi

exec "$python" -m torch.distributed.run \
    --nnodes="$nnodes" --node_rank="$node_rank" --nproc_per_node="$nproc" \
    --rdzv_backend=c10d --rdzv_endpoint="$endpoint" --rdzv_id="$rdzv_id" \
    --rdzv_conf="is_host=$is_host" "${extra[@]}" \
    "$here/train.py" "$@"
