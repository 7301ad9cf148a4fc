"""The CLI's contract: one-line user errors with exit code 2, a JSON last line, `python -m a1_jax`."""

import json
import subprocess
import sys

import pytest

from a1_jax import cli
from a1_jax.config import DiTConfig, SiglipConfig, VAEConfig, read_json
from a1_jax.errors import UserError


def test_missing_config_is_one_line_exit_2(tmp_path, capsys):
    code = cli.main(["parity", "vae", "--config", str(tmp_path / "absent.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "config not found" in err and "Traceback" not in err


def test_python_dash_m_entry_point(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "a1_jax", "parity", "dit", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("a1-jax: error: config is not valid JSON")
    assert "Traceback" not in proc.stderr


def test_read_json_rejects_non_objects(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(UserError, match="must be a JSON object"):
        read_json(path)


def test_configs_take_library_defaults_and_ignore_bookkeeping_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": "0.32.2",
                                "latent_channels": 8, "block_out_channels": [32, 64, 64, 64]}))
    config = VAEConfig.from_json(path)
    assert config.latent_channels == 8 and config.block_out_channels == (32, 64, 64, 64)
    assert config.layers_per_block == 3 and config.norm_num_groups == 32
    assert DiTConfig().inner_dim == 30 * 64


def test_siglip_config_reads_either_kind(tmp_path):
    vision = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 14}
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 9},
                                                                "vision_config": vision}))
    (tmp_path / "vision.json").write_text(json.dumps(vision))
    assert SiglipConfig.from_json(tmp_path / "full") == SiglipConfig.from_json(tmp_path / "vision.json")
    assert SiglipConfig.from_json(tmp_path / "vision.json").hidden_size == 32


def test_wrong_class_name_is_rejected(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UserError, match="expected an AutoencoderKLCogVideoX config"):
        VAEConfig.from_json(path)
