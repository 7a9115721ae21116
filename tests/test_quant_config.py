"""Quantization-config parsing: every spelling we reproduce exactly, and clear refusals for the rest."""

from __future__ import annotations

import json

import pytest

from oftsurgery.errors import InvalidCheckpointError, UnsupportedFormatError
from oftsurgery.quant.config import load_quant_config, parse_quant_config


def test_old_gptq_spelling():
    cfg = parse_quant_config(
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False, "checkpoint_format": "gptq"}
    )
    assert (cfg.method, cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym, cfg.format) == ("gptq", 4, 128, True, False, "gptq")


def test_gptqmodel7_spelling():
    cfg = parse_quant_config({"method": "gptq", "bits": 3, "group_size": -1, "format": "gptq_v2", "pack_dtype": "int32"})
    assert (cfg.bits, cfg.group_size, cfg.format, cfg.sym, cfg.desc_act) == (3, -1, "gptq_v2", True, False)


def test_awq_gemm():
    cfg = parse_quant_config({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"})
    assert cfg.is_awq and cfg.format == "gemm" and not cfg.sym


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "rotation": "hadamard"}, "rotation"),
        ({"quant_method": "gptq", "bits": 5, "group_size": 128}, "bits=5"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "marlin"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "gemv"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv_fast"}, "gemv_fast"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "marlin"}, "marlin"),
        ({"quant_method": "awq", "bits": 3, "group_size": 128, "version": "gemm"}, "bits=3"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ({"method": "paroquant", "bits": 4, "group_size": 128}, "paroquant"),
        ({"bits": 4}, "no quantization method"),
    ],
)
def test_refusals_name_what_was_found(raw, words):
    with pytest.raises(UnsupportedFormatError) as info:
        parse_quant_config(raw, "cfg")
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_load_prefers_config_json_then_quantize_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedFormatError, match="not quantized"):
        load_quant_config(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": 64, "quant_method": "gptq"}))
    assert load_quant_config(tmp_path).bits == 8
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 2, "group_size": 32}})
    )
    assert load_quant_config(tmp_path).bits == 2


def test_load_missing_and_broken(tmp_path):
    with pytest.raises(InvalidCheckpointError):
        load_quant_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidCheckpointError, match="JSON"):
        load_quant_config(tmp_path)
