"""oneDNN is on by default wherever dreamer_tf starts (unless the user chose), and the harmless
error-level line it makes TensorFlow log is kept off the console."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = ("import dreamer_tf, os; from tensorflow.python.util import _pywrap_util_port as p; "
         "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], p.IsMklEnabled())")


@pytest.mark.parametrize("user, want", [(None, "1 True"), ("0", "0 False"), ("1", "1 True")])
def test_importing_the_package_turns_onednn_on_unless_the_user_chose(user, want):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if user is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = user
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == want.split()


def test_stderr_filter_drops_only_the_named_lines_and_passes_partial_lines():
    code = ("import os, sys; from dreamer_tf.utils import filter_stderr; filter_stderr((b'DROP ME',)); "
            "os.write(2, b'keep 1\\nE0000 x.cc:1] DROP ME please\\nE0000 y.cc:2] real error\\n'); "
            "sys.stderr.write('progress\\r'); sys.stderr.flush(); os.write(2, b'tail without newline')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == 0
    assert out.stderr.count(b"DROP ME") == 0
    for kept in (b"keep 1\n", b"E0000 y.cc:2] real error\n", b"progress\r", b"tail without newline"):
        assert kept in out.stderr


@pytest.mark.slow
def test_debug_run_console_has_no_onednn_int32_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    out = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--preset", "debug", "--logdir",
                          str(tmp_path / "run"), "--no-tensorboard", "--set", "steps=300", "video_every=0"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "finished: 300 env steps" in out.stdout
    assert "DT_INT32" not in out.stderr
    # ... while with the filter off (DREAMER_TF_VERBOSE) TensorFlow does print it: the check above can fail.
    verbose = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--preset", "debug", "--logdir",
                              str(tmp_path / "verbose"), "--no-tensorboard", "--set", "steps=300", "video_every=0"],
                             env={**env, "DREAMER_TF_VERBOSE": "1"}, capture_output=True, text=True, timeout=600)
    assert verbose.returncode == 0 and "DT_INT32" in verbose.stderr
