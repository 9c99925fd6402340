"""Beyond one GPU: tensor parallelism over torch.distributed (NCCL; gloo on CPU) and two-batch overlap.

    tp, device = launch.init(2, "cuda")          # one process per GPU, under torchrun (--tp 2 starts it)
    lm = shard(adapt(hf_model), tp)              # heads, MLP/MoE, vocabulary split over the ranks
    model = TwoBatchOverlap.for_model(lm, compile=lambda m: torch.compile(m, backend=hattn.backend(mode="pcg")))

group.py (TPGroup: rank, size, functional collectives), layers.py (sharding primitives, parallel layers),
plans.py (how each family is sharded), tp.py (shard, replica), overlap.py (two-batch overlap), launch.py (torchrun).
"""
from hattn.parallel.group import TPGroup
from hattn.parallel.tp import replica, shard

__all__ = ["TPGroup", "replica", "shard"]
