"""lightly's NTXentLoss (SimCLR, and MoCo with a memory bank) on the fused kernels.

Same constructor, call, value and gradients as `lightly.loss.NTXentLoss` (1.6.0); the
2B x 2B (or B x K) logits are never built. Switch by changing the import:

    from contrastive_kernels.integrations.lightly import NTXentLoss   # was: lightly.loss

This module does not import lightly.

Without a memory bank: out0 and out1 are L2-normalized and stacked, z = [out0; out1]
(2B rows); row i's positive is its other view, every other row a negative, the mean over
the 2B rows: `info_nce(z, temperature=t)` (key=None, the self-contrast NT-Xent).

gather_distributed=True with a world size > 1: the same loss over the global batch,
`ring_info_nce(z, temperature=t)` (each rank stacks its own two views; the other ranks'
rows travel around the ring, nothing is gathered). As in lightly, each rank returns the
mean over its own 2B rows, and its embeddings get the gradient of the sum of all ranks'
losses (lightly's GatherLayer all-reduces the gradients). Shards may differ in size
here; lightly's all_gather needs them equal.

With a memory bank (memory_bank_size=(K, dim), K > 0): row i of out0 is scored against
its positive out1_i and the K bank entries (frozen negatives), not against the batch:
l_i = softplus(LSE_k s(out0_i, bank_k) - s(out0_i, out1_i)), the mean over B. The
log-sum-exp over the bank is the fused kernel's, info_nce(out0, bank, positive_index=0,
reduction="none") plus the logit of bank entry 0 (O(B D)). The bank is lightly's FIFO
buffer `memory_bank.bank` (K, dim), float32, initialized with normalized Gaussian rows,
with its pointer `memory_bank.bank_ptr`: the loss uses the bank as it was before the
call; then, if out0 requires a gradient (training), the detached normalized out1 (with
gather_distributed and world size > 1, all ranks' out1 gathered in rank order) is
written at the pointer; a batch that reaches the end fills the bank up and the rest of
it is dropped, the pointer going back to 0 (lightly's rule). With a bank,
gather_distributed only gathers what is enqueued (the loss stays local, as in lightly).
The bank is cast to out0's dtype for the kernel (lightly needs them equal).

memory_bank_size: 0 or (0, dim) disables the bank; (K, dim) enables it; a bare int > 0
or a negative entry raises a ValueError (as in lightly 1.6.0). temperature: a float > 0
(lightly also takes a negative one, which raises here).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed import ring_info_nce
from ..loss import info_nce

__all__ = ["NTXentLoss", "MemoryBank"]


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class MemoryBank(torch.nn.Module):
    """lightly's MemoryBankModule as NTXentLoss uses it: a (K, dim) FIFO of negatives."""

    def __init__(self, size, gather_distributed=False):
        super().__init__()
        sizes = (size,) if isinstance(size, int) else tuple(size) if isinstance(
            size, (tuple, list, torch.Size)) else None
        if sizes is None or not all(type(x) is int for x in sizes):
            raise ValueError(f"memory_bank_size must be 0 or (num_features, dim) ints, "
                             f"got {size!r}")
        if any(x < 0 for x in sizes):
            raise ValueError(f"memory_bank_size {size!r}: entries must be non-negative")
        if isinstance(size, int) and size > 0:
            raise ValueError(f"memory_bank_size={size} does not give the feature dimension; "
                             f"pass ({size}, dim), or 0 to disable the memory bank")
        if sizes != (0,) and len(sizes) != 2:
            raise ValueError(f"memory_bank_size {size!r}: expected (num_features, dim) or 0")
        self.size = sizes
        self.gather_distributed = gather_distributed
        bank = torch.zeros(sizes, dtype=torch.float)
        if len(sizes) == 2:
            bank = F.normalize(torch.randn(sizes), dim=-1)
        self.register_buffer("bank", bank, persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)

    @property
    def enabled(self):
        return self.size[0] > 0

    @torch.no_grad()
    def enqueue(self, batch):
        """Write the batch (detached) at the pointer; at the end, fill up and wrap."""
        if self.gather_distributed and _world() > 1:
            parts = [torch.zeros_like(batch) for _ in range(_world())]
            dist.all_gather(parts, batch.contiguous())
            batch = torch.cat(parts)
        k, n = self.size[0], batch.shape[0]
        ptr = int(self.bank_ptr)
        if ptr + n >= k:
            self.bank[ptr:] = batch[:k - ptr]
            self.bank_ptr.zero_()
        else:
            self.bank[ptr:ptr + n] = batch
            self.bank_ptr[0] = ptr + n


class NTXentLoss(torch.nn.Module):
    """lightly.loss.NTXentLoss on the fused kernels (see the module docstring).

    forward(out0, out1) -> 0-dim loss.
    """

    def __init__(self, temperature=0.5, memory_bank_size=0, gather_distributed=False,
                 *, backend="auto"):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a float, got {temperature!r}")
        if abs(temperature) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        if temperature < 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not isinstance(gather_distributed, bool):
            raise ValueError(f"gather_distributed must be a bool, got {gather_distributed!r}")
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed is True but torch.distributed is not "
                             "available")
        self.memory_bank = MemoryBank(memory_bank_size, gather_distributed)
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed
        self.backend = backend

    def forward(self, out0, out1):
        t = self.temperature
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        bank = self.memory_bank
        if not bank.enabled:
            z = torch.cat([out0, out1])
            if self.gather_distributed and _world() > 1:
                loss = ring_info_nce(z, temperature=t, backend=self.backend)
            else:
                loss = info_nce(z, temperature=t, backend=self.backend)
            return loss.to(out0.dtype)
        # the bank before this call's update (frozen negatives)
        neg = bank.bank.detach().clone().to(device=out0.device, dtype=out0.dtype)
        if out0.requires_grad:
            bank.enqueue(out1.detach())
        first = torch.zeros(out0.shape[0], dtype=torch.long, device=out0.device)
        row = info_nce(out0, neg, positive_index=first, temperature=t, reduction="none",
                       backend=self.backend)
        acc = torch.float64 if out0.dtype == torch.float64 else torch.float32
        o0 = out0.to(acc)
        lse = row.to(acc) + (o0 @ neg[0].to(acc)) / t
        pos = (o0 * out1.to(acc)).sum(1) / t
        return F.softplus(lse - pos).mean().to(out0.dtype)
