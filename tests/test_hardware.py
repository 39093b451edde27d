"""Precision that fits the hardware: auto picks bf16 only where it is native."""

import logging

import pytest

from liqe_dist import hardware
from liqe_dist.hardware import describe, native_bf16, resolve_precision


@pytest.mark.parametrize("device,flags,cuda_bf16,expected", [
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, None, "bf16"),   # Sapphire Rapids / Zen 4
    ("cpu", {"avx2", "amx_bf16", "amx_tile"}, None, "bf16"),
    ("cpu", {"avx2"}, None, "fp32"),                              # AMD EPYC without AVX-512: bf16 is 8x slower
    ("cpu", {"avx2", "avx512f"}, None, "fp32"),                   # AVX-512 without its bf16 extension
    ("cuda", set(), True, "bf16"),
    ("cuda:1", set(), False, "fp32"),
])
def test_auto_resolves_by_native_support(device, flags, cuda_bf16, expected):
    assert resolve_precision("auto", device, frozenset(flags), cuda_bf16) == expected


def test_explicit_choices_are_kept_and_emulated_bf16_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(hardware, "_warned", set())
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("fp32", "cpu", frozenset({"avx512_bf16"})) == "fp32"
        assert resolve_precision("bf16", "cpu", frozenset({"avx2"})) == "bf16"
        assert resolve_precision("bf16", "cpu", frozenset({"avx2"})) == "bf16"
    assert caplog.text.count("no native bf16") == 1
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        resolve_precision("fp16")


def test_this_machine_is_described_and_detected(monkeypatch):
    monkeypatch.delenv(hardware.NATIVE_BF16_ENV, raising=False)  # detection itself, not a forced branch
    name, flags = hardware.cpu_info()
    assert name and f"CPU: {name}" in describe()
    assert native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_devices_resolve_from_the_request_not_the_machine():
    import torch

    from liqe_dist.hardware import process_group_backend, resolve_device, training_device

    assert resolve_device("cpu") == torch.device("cpu") and training_device(False) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="must be auto, cpu or cuda"):
        resolve_device("tpu")
    assert process_group_backend(True) == "cpu:gloo,cuda:nccl" and process_group_backend(False) == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
        with pytest.raises(RuntimeError, match="use_gpu is true"):
            training_device(True)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_score_on_cuda_without_a_gpu_is_one_clear_line(tmp_path, caplog):
    from liqe_dist.cli import main

    (tmp_path / "a.png").write_bytes(b"")
    assert main(["score", str(tmp_path / "a.png"), "--model", "liqe-tiny", "--device", "cuda"]) == 2
    assert "device 'cuda': no CUDA GPU" in caplog.text


def test_gpu_runs_get_loader_processes_by_default(tmp_path):
    from liqe_dist.train.config import GPU_CPUS_PER_WORKER, DatasetSpec, TrainConfig

    ds = [DatasetSpec("a", str(tmp_path))]
    cpu, gpu = TrainConfig(datasets=ds), TrainConfig(datasets=ds, use_gpu=True)
    assert (cpu.resolved_cpus_per_worker, cpu.resolved_loader_workers) == (1.0, 0)
    assert (gpu.resolved_cpus_per_worker, gpu.resolved_loader_workers) == (GPU_CPUS_PER_WORKER, 7)
    assert TrainConfig(datasets=ds, use_gpu=True, cpus_per_worker=4).resolved_loader_workers == 3
