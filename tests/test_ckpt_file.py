"""server/ckpt_file.py writes the safetensors format from the arrays."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from server.ckpt_file import f32_digest, save_f32
from shared.messages import sha256_hex


def test_save_f32_is_read_back_by_safetensors_with_its_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    params = rng.standard_normal(1001).astype(np.float32)
    mom = rng.standard_normal((3, 5)).astype(np.float32)
    path = tmp_path / "c.safetensors"
    save_f32(path, {"params": params, "outer_momentum": mom}, {"version": "7", "x": "y"})
    with safe_open(str(path), framework="numpy") as fh:
        assert fh.metadata() == {"version": "7", "x": "y"}
    got = load_file(str(path))
    np.testing.assert_array_equal(got["params"], params)
    np.testing.assert_array_equal(got["outer_momentum"], mom)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0  # the header is padded as safetensors pads it
    assert len(raw) == 8 + n + 4 * (params.size + mom.size)
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed into place


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f4"])
def test_f32_digest_is_the_digest_of_the_float32_bytes(dtype: str) -> None:
    a = np.linspace(-1, 1, 257).astype(dtype)
    assert f32_digest(a) == sha256_hex(a.astype("<f4").tobytes())

