"""`lora.embeddings_on_host`: the frozen input embedding table stays in host memory.

A LoRA run without `train_embeddings` only looks rows up in the input embedding
table: of a 128256 x 4096 bf16 table (0.98 GiB) a step of 4096 tokens reads 32 MiB.
`HostEmbedding` replaces the model's `embed_tokens` on the meta-built model (in
`apply_lora`, before parallelization), keeps the table as its `weight` Parameter
(the same name, so checkpoint keys and exports do not change) in host memory, pinned
when CUDA is available, looks the ids up there and copies only the rows to the ids'
device. Materializing the model on a GPU (`to_empty`, `.to(device)`) leaves the
table on the host.

Refused (`check_embeddings_on_host`, before any work) where the table is needed on
the GPU: trained embeddings, tied embeddings (the table is also the output
projection), and more than one process (FSDP/TP/pipeline stages shard or place it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ft.errors import ConfigError
from ft.lora.config import TRAINED_EMBEDDINGS_ON_HOST, check_embeddings_on_host_layout

TIED_MESSAGE = ("config key 'lora.embeddings_on_host' needs untied embeddings, but this model ties its input "
                "embedding to the output projection (tie_embeddings), which runs on the GPU; use "
                "lora.embeddings_on_host=false with this model")


class HostEmbedding(nn.Module):
    """A frozen embedding whose table lives in host memory; forward returns rows on the ids' device,
    in the table's dtype (the frozen base's compute dtype)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "HostEmbedding":
        if embedding.padding_idx is not None or embedding.max_norm is not None or embedding.sparse:
            raise ValueError("HostEmbedding replaces a plain nn.Embedding (no padding_idx, max_norm or sparse)")
        weight = embedding.weight.detach()
        return cls(weight if weight.device.type in ("meta", "cpu") else _to_host(weight, weight.dtype))

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, tokens_BT: Tensor) -> Tensor:
        # Moving the ids to the host waits for everything queued before on their device (a
        # synchronization): one small bubble per forward, before any block runs.
        ids_N = tokens_BT.to("cpu").reshape(-1)
        # F.embedding without padding_idx/max_norm is this index_select; written into a pinned
        # buffer, the copy to the GPU is asynchronous (the host allocator keeps the buffer until
        # the copy is done).
        rows_ND = torch.empty((ids_N.numel(), self.embedding_dim), dtype=self.weight.dtype,
                              pin_memory=self.weight.is_pinned())
        torch.index_select(self.weight, 0, ids_N, out=rows_ND)
        return rows_ND.view(*tokens_BT.shape, self.embedding_dim).to(tokens_BT.device, non_blocking=True)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "HostEmbedding":
        """Device moves of the model (`to_empty`, `.to(device)`, `.cuda()`) leave the table on the
        host; a dtype change applies. What `fn` does is read off an empty tensor."""
        weight = self.weight
        probe = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        if probe.device.type == "meta":
            new = fn(weight.detach())
        elif weight.device.type == "meta":  # to_empty: uninitialized host memory, loaded next
            new = torch.empty(weight.shape, dtype=probe.dtype, pin_memory=torch.cuda.is_available())
        else:
            new = _to_host(weight.detach(), probe.dtype)
        self.weight = nn.Parameter(new, requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on host"


def _to_host(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    host = tensor.to("cpu", dtype=dtype)
    return host.pin_memory() if torch.cuda.is_available() and not host.is_pinned() else host


def keep_embeddings_on_host(model: nn.Module) -> HostEmbedding:
    """Replace `model.model.embed_tokens` (frozen, untied) by a `HostEmbedding` of the same table."""
    if model.config.tie_embeddings:
        raise ConfigError(TIED_MESSAGE)
    embedding = model.model.embed_tokens
    if embedding.weight.requires_grad:
        raise ConfigError(TRAINED_EMBEDDINGS_ON_HOST)
    model.model.embed_tokens = HostEmbedding.from_embedding(embedding)
    return model.model.embed_tokens


def check_embeddings_on_host(config: Any, *, model_config: Any, dp_size: int, tp_size: int, pp_size: int) -> None:
    """ConfigError where the table cannot stay on the host: tied embeddings, several processes."""
    if not config.embeddings_on_host:
        return
    if model_config.tie_embeddings:
        raise ConfigError(TIED_MESSAGE)
    check_embeddings_on_host_layout(config, data_parallel_size=dp_size, tensor_parallel_size=tp_size,
                                    pipeline_parallel_size=pp_size)
