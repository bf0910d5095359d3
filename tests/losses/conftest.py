import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """These tensors are small: one intra-op thread avoids OpenMP hand-offs that cost more than the work,
    and on a shared 2-core machine a second thread waiting for a busy core slows small ops 10x or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
