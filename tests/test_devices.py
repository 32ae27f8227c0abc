"""--device: which strings pass distributed.check_device and which device each process then takes
(distributed.pick_device), on this CPU-only machine and, with torch's CUDA queries answered as a
machine with two GPUs would answer them, on such a machine, alone and under torchrun."""
import pytest
import torch

from plumbing import distributed
def refused(device):
    with pytest.raises(SystemExit) as e:
        distributed.check_device(device)
    message = str(e.value)
    assert message.startswith("error: --device") and "\n" not in message
    return message


@pytest.fixture
def two_gpus(monkeypatch):
    """torch's answers on a machine with two CUDA devices (this one has none). Only the questions
    check_device and pick_device ask are answered; nothing is allocated on a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.mark.parametrize("typo", ["gpu", "cuda1", "cuda:", "cuda:x", "cuda:-1", "CPU", "", "tpu", "xla"])
def test_typos_and_other_backends_are_refused_in_one_line(typo):
    assert f"must be auto, cpu, cuda or cuda:N, got {typo!r}" in refused(typo)


def test_mps_is_refused_and_says_why():
    for device in ("mps", "mps:0"):
        assert "mps is not supported" in refused(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: tests/test_cuda.py covers it")
def test_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for device in ("auto", "cpu"):
        distributed.check_device(device)
        assert distributed.pick_device(device) == torch.device("cpu")
    for device in ("cuda", "cuda:0", "cuda:1"):
        assert "torch sees no CUDA device" in refused(device)


def test_cuda_n_is_the_nth_gpu_and_one_past_the_last_is_refused(two_gpus):
    for device, index in (("auto", 0), ("cuda", 0), ("cuda:0", 0), ("cuda:1", 1)):
        distributed.check_device(device)
        assert distributed.pick_device(device) == torch.device("cuda", index)
    assert "torch sees 2 CUDA devices: cuda:0 to cuda:1" in refused("cuda:2")
    assert distributed.pick_device("cpu") == torch.device("cpu")


def test_under_torchrun_each_rank_takes_its_local_rank_gpu(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        for device in ("auto", "cuda"):
            distributed.check_device(device)
            assert distributed.pick_device(device) == torch.device("cuda", rank)
        assert distributed.pick_device("cpu") == torch.device("cpu")
    assert "under torchrun: each process takes the GPU of its LOCAL_RANK" in refused("cuda:1")
