"""Devices, strategy, jit and bf16 are checked before TensorFlow (run/devices.py): what cannot run here
is one line naming what is there, with no run directory left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dreamer_tf import config as configlib
from dreamer_tf.run.devices import DeviceError, check_devices, cpu_devices_wanted, parse_devices

AVX2 = {"avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512_vnni"}
ON = {"TF_ENABLE_ONEDNN_OPTS": "1"}


def cfg(**overrides):
    return configlib.load("debug", overrides)


def test_missing_gpus_are_refused_naming_the_visible_devices():
    c = cfg(strategy="mirrored", devices=["/gpu:0", "/gpu:1"], batch_size=4)
    with pytest.raises(DeviceError, match=r"^devices: /gpu:0, /gpu:1 not visible here; visible: /cpu:0 \(no GPU\)"):
        check_devices(c, gpus=0, flags=AVX2, environ=ON)
    with pytest.raises(DeviceError, match=r"devices: /gpu:1 not visible here; visible: /cpu:0, /gpu:0\."):
        check_devices(c, gpus=1, flags=AVX2, environ=ON)
    assert check_devices(c, gpus=2, flags=AVX2, environ=ON) == []


def test_mirrored_without_gpus_or_devices_says_it_runs_one_replica():
    notes = check_devices(cfg(strategy="mirrored"), gpus=0, flags=AVX2, environ=ON)
    assert len(notes) == 1 and "one replica" in notes[0]
    assert check_devices(cfg(strategy="mirrored", batch_size=4), gpus=2, flags=AVX2, environ=ON) == []


def test_cpu_devices_bad_names_splits_and_jit():
    assert parse_devices(["/cpu:0", "/CPU:1", "/device:GPU:0", "gpu:1"]) == [("cpu", 0), ("cpu", 1), ("gpu", 0), ("gpu", 1)]
    assert cpu_devices_wanted(cfg(strategy="mirrored", devices=["/cpu:0", "/cpu:1"], batch_size=4)) == 2
    assert cpu_devices_wanted(cfg(strategy="mirrored", devices=["/cpu:0"])) == 0
    assert cpu_devices_wanted(cfg(strategy="one", devices=["/cpu:0", "/cpu:1"])) == 0
    with pytest.raises(DeviceError, match=r"^devices: '/tpu:0' is not a device name"):
        check_devices(cfg(strategy="mirrored", devices=["/tpu:0"]), gpus=0, flags=AVX2, environ=ON)
    with pytest.raises(DeviceError, match=r"^batch_size 3 .* does not split evenly across 2 replicas"):
        check_devices(cfg(strategy="mirrored", devices=["/cpu:0", "/cpu:1"]), gpus=0, flags=AVX2, environ=ON)
    with pytest.raises(DeviceError, match=r"^jit: true is not supported with strategy mirrored"):
        check_devices(cfg(strategy="mirrored", jit=True), gpus=2, flags=AVX2, environ=ON)


@pytest.mark.parametrize("flags, gpus, refused", [(AVX2, 0, True), (AVX512, 0, True),
                                                  (AVX512 | {"avx512_bf16"}, 0, False), (AVX2, 1, False)])
def test_bf16_is_checked_for_the_cpu_it_is_given(flags, gpus, refused):
    """Both kinds of CPU, whatever this one is: the feature check is posed, not read."""
    c = cfg(precision="bf16")
    if refused:
        with pytest.raises(DeviceError, match=r"^precision bf16 cannot run here: .*AVX512_BF16.*use precision 32$"):
            check_devices(c, gpus=gpus, flags=flags, environ=ON)
    else:
        assert check_devices(c, gpus=gpus, flags=flags, environ=ON) == []


# The CLI in a child process: does it refuse without importing TensorFlow, and leave no directory?
CHILD = ("import sys, json; from dreamer_tf.cli import main; rc = main(sys.argv[1:]); "
         "print(json.dumps({'rc': rc, 'tensorflow': 'tensorflow' in sys.modules}))")


@pytest.mark.parametrize("sets, message", [
    (["strategy=mirrored", "devices=[/gpu:0,/gpu:1]", "batch_size=4"], "not visible here; visible: /cpu:0"),
    (["strategy=mirrored", "jit=true", "devices=[/cpu:0,/cpu:1]", "batch_size=4"], "jit: true is not supported"),
    (["precision=bf16"], "precision bf16 cannot run here: ONEDNN_MAX_CPU_ISA=AVX2"),
])
def test_cli_refuses_in_one_line_before_tensorflow_and_leaves_nothing(tmp_path, sets, message):
    logdir = tmp_path / "run"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "CUDA_VISIBLE_DEVICES": ""}  # no bf16, no GPU, on any machine
    # The old code hung here (a MirroredStrategy over absent GPUs): the timeout bounds the wait.
    proc = subprocess.run([sys.executable, "-c", CHILD, "train", "--preset", "debug", "--logdir", str(logdir),
                           "--set", *sets], capture_output=True, text=True, timeout=240, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 2, "tensorflow": False}, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("dreamer-tf: error: ") and message in err, err
    assert not logdir.exists()


class _FakeTF:
    """The tf.config calls configure_devices makes, on a machine with `gpus` GPUs and one CPU."""

    def __init__(self, gpus: int):
        import types
        self.calls = []
        gpu_list = [types.SimpleNamespace(name=f"/physical_device:GPU:{i}") for i in range(gpus)]
        cpu = types.SimpleNamespace(name="/physical_device:CPU:0")
        self.config = types.SimpleNamespace(
            list_physical_devices=lambda kind: gpu_list if kind == "GPU" else [cpu],
            experimental=types.SimpleNamespace(set_memory_growth=lambda *a: self.calls.append(("growth", *a))),
            get_logical_device_configuration=lambda device: None,
            set_logical_device_configuration=lambda device, confs: self.calls.append(("logical", device.name,
                                                                                       len(confs))),
            LogicalDeviceConfiguration=lambda **kw: ("conf", kw))


def test_start_up_splits_the_cpu_and_says_when_mirrored_is_one_replica(capsys, monkeypatch):
    from dreamer_tf.run import devices
    monkeypatch.setattr(devices, "cpu_model_and_flags", lambda: ("posed", AVX2))
    tf = _FakeTF(0)
    devices.configure_devices(cfg(strategy="mirrored", devices=["/cpu:0", "/cpu:1"], batch_size=4), tf)
    assert tf.calls == [("logical", "/physical_device:CPU:0", 2)]  # before TensorFlow's runtime starts
    assert capsys.readouterr().err == ""
    tf = _FakeTF(0)
    devices.configure_devices(cfg(strategy="mirrored"), tf)
    err = capsys.readouterr().err
    assert tf.calls == [] and err.count("\n") == 1 and "one replica" in err
