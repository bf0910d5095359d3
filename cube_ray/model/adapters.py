"""Universal adapters: a teacher embedding of any width onto the lattice, and a lattice state back to that width.

An adapter writes a field of (cells_in, C) into the lattice: the first D-slice ("surface"; every other cell
starts at zero) or every cell ("volume"). It reads (cells_out, C) back from the last D-slice or from every cell.
Cells are in (d, h, w) order, so both faces are contiguous slices. A strategy is one subclass that defines
`encode` (B, width) -> (B, cells_in, C), `decode` (B, cells_out, C) -> (B, width) and `last_layer` (the linear
layer decode ends with: the residual student starts it at zero); register it in ADAPTERS.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cube_ray.model.config import AdapterConfig, CubeConfig


class Adapter(nn.Module):
    def __init__(self, width: int, cube: CubeConfig, cfg: AdapterConfig):
        super().__init__()
        self.width, self.channels, self.cells = width, cube.channels, cube.cells
        self.cells_in = cube.face if cfg.io == "surface" else cube.cells
        self.cells_out = cube.face if cfg.out == "surface" else cube.cells

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, field: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def last_layer(self) -> nn.Linear:
        raise NotImplementedError

    def to_lattice(self, x: torch.Tensor) -> torch.Tensor:
        """(B, width) -> the initial lattice state (B, cells, C)."""
        return F.pad(self.encode(x), (0, 0, 0, self.cells - self.cells_in))

    def read(self, state: torch.Tensor) -> torch.Tensor:
        """The output cells of a lattice state: (B, cells, C) -> (B, cells_out, C), a view."""
        return state[:, self.cells - self.cells_out:]


class LearnedLinear(Adapter):
    """One linear map each way."""

    def __init__(self, width: int, cube: CubeConfig, cfg: AdapterConfig):
        super().__init__(width, cube, cfg)
        self.inp = nn.Linear(width, self.cells_in * self.channels)
        self.out = nn.Linear(self.cells_out * self.channels, width)

    def encode(self, x):
        return self.inp(x).view(x.shape[0], self.cells_in, self.channels)

    def decode(self, field):
        return self.out(field.flatten(1))

    def last_layer(self):
        return self.out


class Hierarchical(Adapter):
    """Two stages each way through `hidden` numbers with a GELU between: width -> hidden -> field -> hidden -> width."""

    def __init__(self, width: int, cube: CubeConfig, cfg: AdapterConfig):
        super().__init__(width, cube, cfg)
        self.embed = nn.Linear(width, cfg.hidden)
        self.place = nn.Linear(cfg.hidden, self.cells_in * self.channels)
        self.gather = nn.Linear(self.cells_out * self.channels, cfg.hidden)
        self.unembed = nn.Linear(cfg.hidden, width)

    def encode(self, x):
        return self.place(F.gelu(self.embed(x))).view(x.shape[0], self.cells_in, self.channels)

    def decode(self, field):
        return self.unembed(F.gelu(self.gather(field.flatten(1))))

    def last_layer(self):
        return self.unembed


class Autoencoder(Hierarchical):
    """Hierarchical, with the outer stages forming an autoencoder through a `hidden`-wide code.

    compress: width -> code and expand: code -> width can be pre-trained on teacher embeddings alone
    (minimise a reconstruction loss on `reconstruct(x)`), before the cube learns to map codes to codes.
    """

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.embed(x))

    def expand(self, code: torch.Tensor) -> torch.Tensor:
        return self.unembed(code)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.compress(x))


class AttentionBased(Adapter):
    """Cells attend to chunks of the embedding; chunks of the prediction attend to the output cells.

    The embedding is cut into ceil(width / chunk) chunks (zero-padded). In: every input cell has a learned query;
    chunk keys are the chunk's content plus a learned position, values are the chunk mapped to C numbers.
    Out: every chunk has a learned query over the output cells (keys: content plus position) and turns what
    it reads into its `chunk` numbers.
    """

    def __init__(self, width: int, cube: CubeConfig, cfg: AdapterConfig):
        super().__init__(width, cube, cfg)
        e, c = cfg.attention_dim, self.channels
        self.chunk, self.chunks = cfg.chunk, math.ceil(width / cfg.chunk)
        self.cell_query = nn.Parameter(torch.randn(self.cells_in, e))
        self.chunk_pos = nn.Parameter(torch.randn(self.chunks, e))
        self.chunk_key = nn.Linear(cfg.chunk, e)
        self.chunk_value = nn.Linear(cfg.chunk, c)
        self.chunk_query = nn.Parameter(torch.randn(self.chunks, e))
        self.cell_pos = nn.Parameter(torch.randn(self.cells_out, e))
        self.cell_key = nn.Linear(c, e)
        self.cell_value = nn.Linear(c, e)
        self.to_chunk = nn.Linear(e, cfg.chunk)

    def encode(self, x):
        b = x.shape[0]
        chunks = F.pad(x, (0, self.chunks * self.chunk - self.width)).view(b, self.chunks, self.chunk)
        keys = self.chunk_key(chunks) + self.chunk_pos
        return F.scaled_dot_product_attention(self.cell_query.expand(b, -1, -1), keys, self.chunk_value(chunks))

    def decode(self, field):
        b = field.shape[0]
        keys = self.cell_key(field) + self.cell_pos
        read = F.scaled_dot_product_attention(self.chunk_query.expand(b, -1, -1), keys, self.cell_value(field))
        return self.to_chunk(read).flatten(1)[:, : self.width]

    def last_layer(self):
        return self.to_chunk


ADAPTERS: dict[str, type[Adapter]] = {
    "learned_linear": LearnedLinear,
    "hierarchical": Hierarchical,
    "attention_based": AttentionBased,
    "autoencoder": Autoencoder,
}


def build_adapter(width: int, cube: CubeConfig, cfg: AdapterConfig) -> Adapter:
    return ADAPTERS[cfg.strategy](width, cube, cfg)
