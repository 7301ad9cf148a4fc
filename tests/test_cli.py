"""The CLI's contract: one-line user errors with exit code 2, a JSON last line, `python -m a1_jax`."""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

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


# ---------------------------------------------------------------------------------------------- a new user's first run
def test_version_and_every_subcommand_described(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "a1-jax 0.1.0"
    parser = cli.build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert sub.description and len(sub.description) > 60, name  # `a1-jax NAME --help` explains the command
    helps = {action.dest: action.help for action in commands._choices_actions}
    assert set(helps) == set(commands.choices) and all(helps.values())


@pytest.mark.parametrize("argv, words", [
    (["animate", "--example", "--out", "o.mp4", "--guidance", "-5"], "--guidance: must be at least 1"),
    (["animate", "--example", "--out", "o.mp4", "--guidance", "nan"], "expected a finite number"),
    (["animate", "--example", "--out", "o.mp4", "--steps", "0"], "--steps: must be at least 1"),
    (["animate", "--example", "--out", "o.mp4", "--max-frames", "x"], "expected an integer, got 'x'"),
    (["landmarks", "--ref", "r.png", "--driving", "d.mp4", "--out", "c.mp4", "--max-frames", "1"], "at least 2"),
    (["evaluate", "--identity-frames", "-1"], "--identity-frames: must be at least 0"),
])
def test_bad_values_are_one_line_exit_2(capsys, argv, words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_examples_ship_in_the_package_small_and_public_domain():
    from a1_jax import examples
    from a1_jax.io.video import probe_video, read_image

    portrait, driving = examples.portrait_path(), examples.driving_path()
    assert read_image(portrait).shape == (341, 512, 3)
    info = probe_video(driving)
    assert (info.fps, info.num_frames) == (24, 96)  # 48 frames at 12 fps: one window
    for path in (portrait, driving):
        assert os.path.getsize(path) < 400_000
    licences = pathlib.Path(examples.__file__).with_name("LICENSES.md").read_text()
    assert licences.count("public domain") >= 2 and "portrait.png" in licences and "driving.mp4" in licences


@pytest.mark.parametrize("argv, words", [
    (["animate", "--example", "--out", "x.txt"], "use .mp4 (got '.txt')"),
    (["animate", "--example", "--out", "x.gif"], "use .mp4 (got '.gif')"),
    (["animate", "--example", "--out", "o.mp4", "--preview", "p.png"], "--preview p.png"),
    (["animate", "--example", "--out", "/proc/x.mp4"], "no new file can be created in /proc"),
    (["animate", "--ref", "absent.png", "--example", "--out", "o.mp4"], "image not found: absent.png"),
    (["animate", "--out", "o.mp4"], "animate needs --ref (or --example"),
    (["animate", "--example", "--audio", "absent.wav", "--out", "o.mp4"], "file not found: absent.wav (--audio)"),
    (["landmarks", "--ref", "{portrait}", "--driving", "{driving}", "--out", "c.gif"], "use .mp4 (got '.gif')"),
])
def test_bad_paths_fail_in_a_fresh_interpreter_within_seconds(tmp_path, argv, words):
    """Before JAX or MediaPipe load: one line, exit 2, nothing written."""
    from a1_jax import examples

    argv = [a.format(portrait=examples.portrait_path(), driving=examples.driving_path()) for a in argv]
    # The command as `python -m a1_jax` runs it, then a look at what it had imported.
    script = ("import sys; from a1_jax import cli; code = cli.main(sys.argv[1:]); "
              "print('imported', sorted(m for m in ('jax', 'mediapipe') if m in sys.modules)); sys.exit(code)")
    start = time.perf_counter()
    process = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
    seconds = time.perf_counter() - start
    assert process.returncode == 2 and process.stdout == "imported []\n", (process.stdout, process.stderr)
    assert words in process.stderr and len(process.stderr.strip().splitlines()) == 1, process.stderr
    assert not list(tmp_path.iterdir())
    assert seconds < 15, seconds  # ~0.5 s on a quiet 2-core machine
