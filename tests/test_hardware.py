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


def test_this_machine_is_described_and_detected():
    name, flags = hardware.cpu_info()
    assert name and f"CPU: {name}" in describe()
    assert native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)
