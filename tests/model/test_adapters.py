import typing

import pytest
import torch

from cube_ray.model import ADAPTERS, AdapterConfig, CubeConfig, build_adapter
from cube_ray.model.adapters import Autoencoder

DIMS = [[8, 8, 12], [6, 8, 16], [4, 4, 4]]
WIDTHS = [384, 576, 768, 4096]


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("strategy", sorted(ADAPTERS))
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("io, out", [("surface", "surface"), ("surface", "volume"), ("volume", "surface"),
                                     ("volume", "volume")])
def test_adapter_shapes(dims, strategy, width, io, out):
    cube = CubeConfig(dims=dims, channels=4)
    adapter = build_adapter(width, cube, AdapterConfig(strategy=strategy, io=io, out=out, hidden=32))
    x = torch.randn(2, width)
    with torch.no_grad():
        lattice = adapter.to_lattice(x)
        assert lattice.shape == (2, cube.cells, 4)
        face = dims[1] * dims[2]
        if io == "surface":  # only the first D-slice holds the input
            assert torch.all(lattice[:, face:] == 0) and lattice[:, :face].abs().sum() > 0
        readout = adapter.read(lattice)
        assert readout.shape == (2, face if out == "surface" else cube.cells, 4)
        if out == "surface":
            assert torch.equal(readout, lattice[:, -face:])
        assert adapter.decode(readout).shape == (2, width)


def test_autoencoder_reconstructs_through_its_code():
    adapter = build_adapter(384, CubeConfig(), AdapterConfig(strategy="autoencoder", hidden=64))
    assert isinstance(adapter, Autoencoder)
    x = torch.randn(3, 384)
    assert adapter.compress(x).shape == (3, 64)
    torch.testing.assert_close(adapter.reconstruct(x), adapter.expand(adapter.compress(x)))
    # pre-training: the bottleneck alone learns to reconstruct
    torch.manual_seed(0)
    data = torch.randn(32, 16) @ torch.randn(16, 384)  # rank 16 < the 64-wide code
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    for _ in range(150):
        loss = 1 - torch.cosine_similarity(adapter.reconstruct(data), data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_registry_matches_the_config_choices():
    assert set(ADAPTERS) == set(typing.get_args(typing.get_type_hints(AdapterConfig)["strategy"]))
