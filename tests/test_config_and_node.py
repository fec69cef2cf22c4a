"""Run config (TOML + flags, resume rules), node identity, text-file runs."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import numpy as np
import pytest

from ml.data import DataSpec
from ml.workload import from_spec, resolve
from native_node.trainer import Trainer
from server.config import RunConfig, load_toml
from server.runstate import open_run
from transport.identity import load_or_create_identity


def test_toml_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\nmodel = "mlp-digits"\ninner_steps = 7\nquorum = 3\n')
    base = load_toml(cfg)
    run = RunConfig.from_dict(base).merged({"quorum": 2, "rounds": None}, resuming=False)
    assert (run.model, run.inner_steps, run.quorum, run.rounds) == ("mlp-digits", 7, 2, 0)


@pytest.mark.parametrize(("text", "needle"), [
    ("inner_step = 3\n", "unknown config key"),
    ("quorum = 0\n", "quorum"),
    ('aggregator = "krumm"\n', "aggregator"),
    ('codec = "zip"\n', "codec"),
    ('partition = "weird"\n', "partition"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=needle):
        load_toml(cfg)


def test_resume_keeps_the_run_and_refuses_fixed_key_changes(tmp_path: Path) -> None:
    first = open_run(tmp_path / "d", {"model": "mlp-digits", "rounds": 2})
    run_id, digest = first.run_id, first.params_digest
    first.store.close()
    again = open_run(tmp_path / "d", {"rounds": 5, "quorum": 2})
    assert (again.run_id, again.params_digest, again.version) == (run_id, digest, 0)
    assert again.config.rounds == 5
    assert again.config.model == "mlp-digits"
    again.store.close()
    with pytest.raises(ValueError, match="cannot change"):
        open_run(tmp_path / "d", {"model": "gpt-tiny"})


def test_node_identity_is_stable_and_private(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path / "n")
    again = load_or_create_identity(tmp_path / "n")
    assert a == again
    assert len(a.node_id) == 64
    assert len(a.public_key) == 1952
    assert a.node_id == hashlib.sha256(a.public_key).hexdigest()
    key = tmp_path / "n" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    key.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_identity(tmp_path / "n")
    key.chmod(0o600)
    key.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="not a DAA Prime ML-DSA-65 node key"):
        load_or_create_identity(tmp_path / "n")


def test_key_files_hold_a_seed_and_old_expanded_files_still_sign(tmp_path: Path) -> None:
    from shared.platform import PqcryptoMLDSA65, signatures

    a = load_or_create_identity(tmp_path / "n")
    blob = (tmp_path / "n" / "node.key").read_bytes()
    assert blob[:8] == b"DAAPKEY2"
    assert len(blob) == 8 + 1952 + 32
    damaged = bytearray(blob)
    damaged[-1] ^= 1  # another seed: another key pair than the stored public key
    (tmp_path / "n" / "node.key").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="not the one its seed derives"):
        load_or_create_identity(tmp_path / "n")
    pk, sk = PqcryptoMLDSA65().keygen()  # a file written before seeds: DAAPKEY1, 4032 bytes
    (tmp_path / "old").mkdir()
    old = tmp_path / "old" / "node.key"
    old.write_bytes(b"DAAPKEY1" + pk + sk)
    old.chmod(0o600)
    b = load_or_create_identity(tmp_path / "old")
    assert b.public_key == pk
    assert len(b.secret_key) == 4032
    for ident in (a, b):
        sig = signatures().sign(ident.secret_key, b"m", b"ctx")
        assert PqcryptoMLDSA65().verify(ident.public_key, b"m", sig, b"ctx")


def test_text_file_run_and_node_local_copy(tmp_path: Path) -> None:
    text = ("the quick brown fox jumps over the lazy dog. " * 200).encode()
    src = tmp_path / "corpus.txt"
    src.write_bytes(text)
    work = resolve(model="gpt-tiny", flavour=None, data="text", data_path=str(src),
                   partition="noniid", alpha=0.5, seed=0)
    assert work.model_config["vocab_size"] == len(set(text.decode()))
    assert work.dataset.entropy_floor is None
    copy = tmp_path / "copy.txt"
    copy.write_bytes(text)
    node_work = from_spec(work.model_config, work.data_spec, local_path=str(copy))
    assert node_work.model_id == work.model_id
    trainer = Trainer(node_work, shard=1, n_shards=4, node_id="x")
    theta = np.zeros(node_work.n_params, np.float32) + 0.01
    result = trainer.train_round(theta, steps=2, lr=1e-3, batch_size=4)
    assert result.delta.shape == theta.shape
    assert result.steps == 2
    copy.write_bytes(text + b"!")  # a different file must be refused, naming both digests
    with pytest.raises(ValueError, match="sha256"):
        from_spec(work.model_config, DataSpec.from_dict(work.data_spec.to_dict()),
                  local_path=str(copy))


def test_gpt_model_refuses_digits_data() -> None:
    with pytest.raises(ValueError, match="cannot train"):
        resolve(model="gpt-tiny", flavour=None, data="digits", data_path=None,
                partition="iid", alpha=0.5, seed=0)


def test_aggregator_must_handle_a_quorum_sized_round() -> None:
    with pytest.raises(ValueError, match="aggregator 'krum' with quorum 2"):
        RunConfig(aggregator="krum", quorum=2)
    ok = RunConfig(aggregator="krum", quorum=5, byzantine_fraction=0.2)
    assert ok.aggregator == "krum"
    with pytest.raises(ValueError, match="aggregator 'mean'"):
        RunConfig(aggregator_params={"bogus": 1})
    with pytest.raises(ValueError, match="coordinate-wise"):
        RunConfig(transport="p2p", aggregator="krum", quorum=5)
    with pytest.raises(ValueError, match="validation"):
        RunConfig(transport="p2p", aggregator="median", validation=True)
    assert RunConfig(transport="p2p", aggregator="median").p2p_replicas == 2
    with pytest.raises(ValueError, match="codec"):  # slices travel as float32
        RunConfig(transport="p2p", aggregator="median", codec="int8-block")
    with pytest.raises(ValueError, match="p2p_result_codec"):
        RunConfig(transport="p2p", aggregator="median", p2p_result_codec="int8-block")
    assert RunConfig(transport="p2p", aggregator="median").p2p_result_codec == "fp16"
    with pytest.raises(ValueError, match="worker_momentum"):
        RunConfig(worker_momentum=1.0)
    with pytest.raises(ValueError, match="cc_reference"):
        RunConfig(cc_reference="previous")


def test_a_run_with_more_shards_than_training_rows_is_refused_before_it_exists(
        tmp_path: Path) -> None:
    from server.runstate import open_run

    with pytest.raises(ValueError, match="exceeds the 1618 training rows"):
        open_run(tmp_path / "run", {"model": "mlp-digits", "n_shards": 10_000})
    run = open_run(tmp_path / "run", {"model": "mlp-digits", "n_shards": 1618})
    assert run.config.n_shards == 1618
