"""One optimizer step of a tiny MoE model with an expert bias, on one process or as one rank of
a 2-process gloo group: the reference and the worker of test_router_balancing's DDP tests.

Global batch: ``WORLD * ACCUM * B_MICRO`` windows of T tokens. Micro-batch i of the one-process
run is the union of the ranks' micro-batch i, so the one-process run sees exactly the tokens the
ranks see together, micro-batch by micro-batch.

Run as a script: ``python router_ddp_worker.py RANK INIT_FILE OUT`` (gloo, file:// rendezvous);
rank 0 saves ``{aux type: step result}`` to OUT with torch.save.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.modeling.balancing import bias_routers
from rmoe.training.optim import adamw
from rmoe.training.step import accumulate_gradients, apply_update, attach_router_step

WORLD, ACCUM, B_MICRO, T, VOCAB = 2, 2, 2, 8, 64
AUX_TYPES = ("global", "switch")


def build_model(aux_type: str) -> RMoEForCausalLM:
    """A seeded 2-layer model: linear router, expert bias (rate 0.01), the given balance loss
    with a large coefficient (so its gradient shows)."""
    torch.manual_seed(0)
    cfg = RMoEConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, moe_intermediate_size=16, intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32, router_type="linear",
        router_expert_bias=True, router_bias_update_rate=0.01, router_aux_loss_type=aux_type,
        router_aux_loss_coef=0.5,
    )  # fmt: skip
    return RMoEForCausalLM(cfg)


def micro_batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's ACCUM micro-batches (x [b, T], y [b, T]); b = B_MICRO * WORLD / world."""
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (ACCUM, WORLD, B_MICRO, T + 1), generator=g)
    if world == 1:
        parts = [data[i].reshape(WORLD * B_MICRO, T + 1) for i in range(ACCUM)]
    else:
        parts = [data[i, rank] for i in range(ACCUM)]
    return [(d[:, :-1], d[:, 1:]) for d in parts]


def one_step(aux_type: str, rank: int = 0, world: int = 1) -> dict:
    """One optimizer step (AdamW with weight decay, the router-step hook installed); returns
    the logged losses, the gradients the optimizer saw and the expert biases after the step."""
    model = build_model(aux_type).train()
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model)
    opt = adamw(model, lr=1e-2, weight_decay=0.1)
    attach_router_step(model, opt)
    rec = accumulate_gradients(
        train_model, model.config, iter(micro_batches(rank, world)), ACCUM, world_size=world
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    apply_update(opt, None, model.parameters())
    return {
        "loss": rec.loss,
        "lm_loss": rec.lm_loss,
        "aux_loss": rec.aux_loss,
        "grads": grads,
        "biases": [r.expert_bias.clone() for r in bias_routers(model)],
    }


def main(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        res = {aux: one_step(aux, rank, WORLD) for aux in AUX_TYPES}
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(res, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
