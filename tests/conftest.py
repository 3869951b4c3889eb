"""Suite-wide settings shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models under test are tiny: intra-op threads only contend with each other on a small or shared CPU.

    Measured 3x (trainer tests) to 100x (busy 2-core machine) slower with two threads.
    Subprocess tests (examples, resume, bench) choose their own thread counts.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
