"""MIGU under 2-process data parallelism (gloo, CPU): the statistics are summed over processes,
so every process keeps the same rows, the ones one process keeps on the whole batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from rmoe import RMoEConfig, RMoEForCausalLM
    from rmoe.continual import MIGU

    OUT = sys.argv[1]


    def build():
        torch.manual_seed(0)
        cfg = RMoEConfig(vocab_size=40, hidden_size=12, num_hidden_layers=2,
                         num_attention_heads=2, moe_intermediate_size=10, num_experts=4,
                         num_experts_per_tok=2, router_type="recurrent", router_dim=6)
        return RMoEForCausalLM(cfg)


    def batch():
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 40, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1, :5] = 0
        mask[2, :3] = 0
        return ids, mask


    def step(model, migu, ids, mask):
        migu.set_token_mask(mask)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return migu.apply_()


    def worker(rank, sync):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{OUT}/rdzv_{int(sync)}",
                                rank=rank, world_size=2)
        model = build()
        migu = MIGU(model, ratio=0.7, sync=sync)
        ids, mask = batch()
        shard = slice(2 * rank, 2 * rank + 2)
        masks = step(model, migu, ids[shard], mask[shard])
        torch.save({"masks": masks}, f"{OUT}/rank{rank}_sync{int(sync)}.pt")
        dist.destroy_process_group()


    if __name__ == "__main__":
        model = build()
        migu = MIGU(model, ratio=0.7)
        torch.save({"masks": step(model, migu, *batch())}, f"{OUT}/single.pt")
        for sync in (True, False):
            mp.spawn(worker, args=(sync,), nprocs=2, join=True)
    """
)


@pytest.mark.slow
def test_migu_masks_agree_across_processes_and_with_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=240)
    load = lambda name: torch.load(tmp_path / name, weights_only=True)  # noqa: E731
    single = load("single.pt")
    r0, r1 = load("rank0_sync1.pt"), load("rank1_sync1.pt")
    assert set(single["masks"]) == set(r0["masks"]) == set(r1["masks"])
    assert any(".experts." in n for n in single["masks"])
    for name, keep in single["masks"].items():
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["masks"][name], keep), name
    # without sync each process keeps its own rows: the replicas would drift apart
    u0, u1 = load("rank0_sync0.pt"), load("rank1_sync0.pt")
    differ = [n for n in u0["masks"] if not torch.equal(u0["masks"][n], u1["masks"][n])]
    assert len(differ) > len(u0["masks"]) // 2
