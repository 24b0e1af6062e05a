"""Tests of the train-step profiler (dreamer_tf.study.profile): the trace parser on a real tiny
trace and on a hand-built one, the aggregation math, the op-name -> part mapping and the writer."""
from __future__ import annotations

import pytest

from dreamer_tf import config as configlib
from dreamer_tf.study import profile
from dreamer_tf.study import xplane
from dreamer_tf.study.op_parts import (BEHAVIOUR_HEADS, DECODER, ENCODER, GRAD_OTHER, HEADS, IMAGINE, KL, OBSERVE,
                                       OPTIMISER, OTHER, PartMapper)
from dreamer_tf.study.xplane import OpEvent

# --------------------------------------------------------------------------------------------
# A real trace: the debug preset, 2 steps.


@pytest.fixture(scope="module")
def debug_profile(tmp_path_factory):
    config = configlib.load("debug")
    return profile.profile(config, steps=2, warmup=1, logdir=tmp_path_factory.mktemp("trace"), peak=False)


def _part(result, name):
    return next(r for r in result["parts"] if r["key"] == name)


def test_real_trace_op_kinds_and_step(debug_profile):  # in-process, as the fast tests of this trace
    r = debug_profile
    assert r["steps"] == 2 and r["wall_seconds"] > 0 and len(r["step_seconds"]) == 2
    kinds = {k["key"]: k for k in r["kinds"]}
    # Dense layers run as MatMul-like kernels (MatMul, _MklMatMul, _MklNativeFusedMatMul, ...), the
    # encoder and decoder as convolutions and their gradients.
    assert any("MatMul" in k and v["seconds"] > 0 for k, v in kinds.items()), sorted(kinds)
    assert any("Conv2D" in k for k in kinds) and any("Conv2DBackprop" in k for k in kinds), sorted(kinds)
    assert abs(sum(k["share"] for k in r["kinds"]) - 1) < 1e-9
    assert r["op_seconds"] == pytest.approx(sum(k["seconds"] for k in r["kinds"]))
    # Thousands of ops per step (a loop body per time step, their gradients, Adam per variable).
    assert r["ops_per_step"] > 1000
    # Op threads cannot be busier than there are threads (2 steps, so overlap only within the step).
    assert 0 < r["op_threads_busy"] <= r["threads"].get("tf_Compute", 1) + 1 + 1e-6
    assert r["cores_busy"] >= r["op_threads_busy"]
    assert 0 < r["process_cores_untraced"] <= r["machine"]["cores"] + 0.5
    # oneDNN is on in this package by default (dreamer_tf sets TF_ENABLE_ONEDNN_OPTS=1): _Mkl ops.
    if r["machine"]["onednn"]:
        assert r["onednn"]["op_time"] > 0 and any(k["onednn"] for k in r["kinds"])


def test_real_trace_parts(debug_profile):
    r = debug_profile
    assert [row["key"] for row in r["parts"]] == list(profile.PARTS)
    assert abs(sum(row["share"] for row in r["parts"]) - 1) < 1e-9
    for part in (ENCODER, OBSERVE, DECODER, HEADS, IMAGINE, BEHAVIOUR_HEADS, OPTIMISER,
                 f"grad {ENCODER}", f"grad {DECODER}", f"grad {OBSERVE}", f"grad {IMAGINE}"):
        assert _part(r, part)["share"] > 0, part
    # The convolutions are where the names say: the encoder's forward convs, the decoder's
    # transposed convs (Conv2DBackpropInput kernels), and their gradients. Among the largest kinds,
    # not necessarily first: at the debug size a descheduled Cast can outlast the tiny convolutions.
    assert any("Conv2D" in kind for kind, *_ in _part(r, ENCODER)["top_kinds"]), _part(r, ENCODER)["top_kinds"]
    assert any("Conv2DBackpropInput" in kind for kind, *_ in _part(r, DECODER)["top_kinds"])
    # "other" holds only unscoped glue (time-major transposes, lambda-return arithmetic, sampling
    # noise, the likelihood target's preprocessing): about 3% of the debug step's ops and 5% of
    # its time. A mapping that lost a part (gradients are over half the ops, the optimiser a
    # third, the loops a quarter) would push it far above 10% of the ops. The time bound is
    # looser because on a loaded machine one descheduled op can take milliseconds.
    other_ops = _part(r, OTHER)["calls"] / r["ops_per_step"]
    assert other_ops < 0.10, other_ops
    assert r["other_share"] < 0.30, r["other_share"]


def test_real_trace_markdown(debug_profile, tmp_path):
    section = profile.markdown_section(debug_profile, "python scripts/profile_step.py --preset debug", "debug (test)")
    assert section.startswith("## debug (test)")
    assert "`python scripts/profile_step.py --preset debug`" in section
    assert "TF_ENABLE_ONEDNN_OPTS=" in section and "ONEDNN_MAX_CPU_ISA=" in section
    assert "| encoder |" in section and "| other |" in section and "| rest (" in section
    assert "not measured" in section  # peak=False


# --------------------------------------------------------------------------------------------
# The parser on a hand-built trace.

UNIT = 1000  # ps per time unit below


def _xspace(path):
    pb2 = xplane._xplane_pb2()
    space = pb2.XSpace()
    space.planes.add().name = "Task Environment"
    plane = space.planes.add()
    plane.name = "/host:CPU"
    names = {}

    def meta(name, display=""):
        if (name, display) not in names:
            i = len(names) + 1
            names[(name, display)] = i
            plane.event_metadata[i].id = i
            plane.event_metadata[i].name = name
            plane.event_metadata[i].display_name = display
        return names[(name, display)]

    stat_ids = {}
    for i, s in enumerate(("_pt", "_p", "_ct", "_c", "step_num"), 1):
        plane.stat_metadata[i].id = i
        plane.stat_metadata[i].name = s
        stat_ids[s] = i

    def event(line, name, start, duration=0, display="", base_ns=0, **stats):
        ev = line.events.add()
        ev.metadata_id = meta(name, display)
        ev.offset_ps = start * UNIT - base_ns * 1000
        ev.duration_ps = duration * UNIT
        for k, v in stats.items():
            st = ev.stats.add()
            st.metadata_id = stat_ids[k]
            st.int64_value = v

    def op(line, name, typ, start, duration):
        event(line, f"{name}:{typ}", start, duration, display=typ)

    python = plane.lines.add()
    python.name = "python"
    event(python, profile.STEP_MARKER, 100, 1000, step_num=0)
    event(python, profile.STEP_MARKER, 1200, 1000, step_num=1)
    compute = plane.lines.add()
    compute.name = "tf_Compute/123"
    event(compute, "ThreadpoolListener::StartRegion", 120, _ct=15, _c=1)   # executor work: not pool time
    op(compute, "scan/while/body/_1/scan/while/mul", "Mul", 20, 50)         # before the first step: left out
    op(compute, "encoder_1/conv1_1/Relu", "_MklNativeFusedConv2D", 150, 300)
    event(compute, "ThreadpoolListener::Record", 200, _pt=15, _p=7)
    op(compute, "cond/then/_1/cond/model_opt/AssignVariableOp", "AssignVariableOp", 500, 400)
    op(compute, "cond/then/_1/cond/model_opt/ReadVariableOp", "ReadVariableOp", 600, 100)  # nested
    event(compute, "ThreadpoolListener::StopRegion", 1000)
    op(compute, "stack_5", "Pack", 1300, 100)
    event(compute, "ThreadpoolListener::Record", 1350, _pt=15, _p=8)
    pool1 = plane.lines.add()
    pool1.name = "tf_numa_-1_Eigen/1"
    pool1.timestamp_ns = 7  # offsets are relative to the line's start
    event(pool1, "ThreadpoolListener::StartRegion", 210, base_ns=7, _ct=15, _c=7)
    event(pool1, "ThreadpoolListener::Record", 300, base_ns=7, _pt=15, _p=9)  # hands on work of the conv
    event(pool1, "ThreadpoolListener::StopRegion", 410, base_ns=7)
    event(pool1, "ThreadpoolListener::StartRegion", 1360, base_ns=7, _ct=15, _c=8)
    event(pool1, "ThreadpoolListener::StopRegion", 1380, base_ns=7)
    pool2 = plane.lines.add()
    pool2.name = "tf_numa_-1_Eigen/2"
    event(pool2, "ThreadpoolListener::StartRegion", 320, _ct=15, _c=9)
    event(pool2, "ThreadpoolListener::StopRegion", 370)
    event(pool2, "ThreadpoolListener::StartRegion", 1500, _ct=15, _c=99)  # no producer in the trace
    event(pool2, "ThreadpoolListener::StopRegion", 1530)
    path.write_bytes(space.SerializeToString())
    return path


def test_parse_hand_built_trace(tmp_path):
    trace = profile.parse_xspace(_xspace(tmp_path / "t.xplane.pb"))
    assert trace.steps == 2
    assert trace.span_ps == 2100 * UNIT
    assert trace.step_ps == [1000 * UNIT, 1000 * UNIT]
    ops = {e.name: e for e in trace.ops}
    assert set(ops) == {"encoder_1/conv1_1/Relu", "cond/then/_1/cond/model_opt/AssignVariableOp",
                        "cond/then/_1/cond/model_opt/ReadVariableOp", "stack_5"}
    conv = ops["encoder_1/conv1_1/Relu"]
    assert conv.type == "_MklNativeFusedConv2D" and conv.duration_ps == 300 * UNIT
    assert conv.pool_ps == (200 + 50) * UNIT  # its own region and the one that region handed on
    assert ops["cond/then/_1/cond/model_opt/AssignVariableOp"].duration_ps == 300 * UNIT  # self time
    assert ops["cond/then/_1/cond/model_opt/ReadVariableOp"].duration_ps == 100 * UNIT
    assert ops["stack_5"].pool_ps == 20 * UNIT
    assert trace.pool_unattributed_ps == 30 * UNIT
    assert trace.threads == {"python": 1, "tf_Compute": 1, "tf_numa_-1_Eigen": 2}

    s = profile.summarize(trace, PartMapper())
    assert s["wall_seconds"] == pytest.approx(1050 * UNIT / 1e12)
    assert s["op_seconds"] == pytest.approx(400 * UNIT / 1e12)
    assert s["pool_seconds"] == pytest.approx(135 * UNIT / 1e12)
    assert s["op_threads_busy"] == pytest.approx(800 / 2100)
    assert s["cores_busy"] == pytest.approx(1070 / 2100)
    shares = {r["key"]: r["share"] for r in s["parts"]}
    assert shares[ENCODER] == pytest.approx(300 / 800)
    assert shares[OPTIMISER] == pytest.approx(400 / 800)
    assert shares[OTHER] == s["other_share"] == pytest.approx(100 / 800)
    assert s["onednn"]["op_time"] == pytest.approx(300 / 800)


def test_find_xplane(tmp_path):
    with pytest.raises(FileNotFoundError):
        profile.find_xplane(tmp_path)
    run = tmp_path / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    (run / "host.xplane.pb").write_bytes(b"")
    assert profile.find_xplane(tmp_path) == run / "host.xplane.pb"


# --------------------------------------------------------------------------------------------
# Aggregation math on fabricated events.

EVENTS = [("a/MatMul", "MatMul", 300), ("b/MatMul", "MatMul", 100), ("c/conv", "Conv2D", 400),
          ("d/mm", "_MklMatMul", 200)]


def test_aggregate_by_type():
    rows = profile.op_kind_table(EVENTS, steps=2)
    # Total 1000 ps over 2 steps. Ties (Conv2D and MatMul, 400 ps each) are ordered by name.
    assert [r["key"] for r in rows] == ["Conv2D", "MatMul", "_MklMatMul"]
    assert [r["share"] for r in rows] == pytest.approx([0.4, 0.4, 0.2])
    assert [r["seconds"] for r in rows] == pytest.approx([200e-12, 200e-12, 100e-12])
    assert [r["calls"] for r in rows] == pytest.approx([0.5, 1.0, 0.5])
    assert [r["onednn"] for r in rows] == [False, False, True]


def test_aggregate_custom_key_and_pool():
    events = [OpEvent("x", "Mul", 100, 50), OpEvent("y", "Mul", 300, 0), OpEvent("z", "_MklMatMul", 600, 400)]
    rows = profile.aggregate(events, lambda e: e.name in ("x", "y"), steps=1)
    assert [(r["key"], r["share"]) for r in rows] == [(False, pytest.approx(0.6)), (True, pytest.approx(0.4))]
    assert rows[1]["pool_seconds"] == pytest.approx(50e-12)
    share = profile.onednn_share(events)
    assert share["op_time"] == pytest.approx(0.6)
    assert share["op_and_pool_time"] == pytest.approx(1000 / 1450)
    assert profile.aggregate([], lambda e: e.type) == []


def test_part_table_fabricated():
    events = [("encoder_1/conv1_1/Relu", "_MklNativeFusedConv2D", 600),
              ("gradient_tape/encoder_1/conv1_1/Conv2DBackpropFilter", "Conv2DBackpropFilter", 200),
              ("transpose_3", "Transpose", 100), ("transpose_4", "Transpose", 100)]
    rows = {r["key"]: r for r in profile.part_table(events, PartMapper(), steps=1)}
    assert set(rows) == set(profile.PARTS)
    assert rows[ENCODER]["share"] == pytest.approx(0.6)
    assert rows[f"grad {ENCODER}"]["share"] == pytest.approx(0.2)
    assert rows[OTHER]["share"] == pytest.approx(0.2) and rows[OTHER]["calls"] == 2
    assert rows[OTHER]["top_kinds"] == [("Transpose", pytest.approx(1.0))]
    assert rows[DECODER]["share"] == 0 and rows[DECODER]["top_kinds"] == []


# --------------------------------------------------------------------------------------------
# The op-name -> part mapping on hand-written names (as TF 2.21 / Keras 3 name them).

SCAN_NAMES = {
    "encoder_1/conv2_1/Relu": ENCODER,
    "encoder_1/mul": ENCODER,
    "state_encoder_1/hidden1_1/Elu": ENCODER,
    "scan/while/body/_1/scan/while/transition_gru_1/BiasAdd": OBSERVE,
    "scan/while/body/_1/scan/while/Softplus": OBSERVE,
    "transition_in_1/Elu": OBSERVE,            # the step tf.scan traces outside the observe loop
    "representation_hidden_1/Elu": OBSERVE,
    "decoder_1/deconv1_1/conv_transpose": DECODER,
    "IndependentNormal_CONSTRUCTED_AT_decoder_1/log_prob/Normal/log_prob/SquaredDifference": DECODER,
    "reward_1/hidden1_1/Tensordot/MatMul": HEADS,   # the first reward call: the world model loss
    "IndependentNormal_CONSTRUCTED_AT_reward_1/log_prob/Normal/log_prob/SquaredDifference": HEADS,
    "pcont_1/hidden1_1/Elu": HEADS,
    "state_decoder_1/out_1/BiasAdd": HEADS,
    "state_model_1/hidden1_1/Elu": HEADS,
    "reward_3/hidden1_1/Tensordot/MatMul": BEHAVIOUR_HEADS,  # the second: on imagined features
    "pcont_3/out_1/BiasAdd": BEHAVIOUR_HEADS,
    "value_1/out_1/BiasAdd": BEHAVIOUR_HEADS,
    "value_3/out_1/BiasAdd": BEHAVIOUR_HEADS,
    "IndependentNormal_CONSTRUCTED_AT_value_3/log_prob/Normal/log_prob/SquaredDifference": BEHAVIOUR_HEADS,
    "actor_3/hidden1_1/Elu": BEHAVIOUR_HEADS,  # the second actor call: the entropy metric
    "TanhNormal_CONSTRUCTED_AT_actor_3/entropy/Log": BEHAVIOUR_HEADS,
    "scan_1/while/body/_664/scan_1/while/actor_1/hidden1_1/Elu": IMAGINE,
    "scan_1/while/body/_664/scan_1/while/transition_in_1/Elu": IMAGINE,
    "actor_1/hidden4_1/Elu": IMAGINE,          # the first actor call: the rollout's first step
    "TanhNormal_CONSTRUCTED_AT_actor_1/sample_and_log_prob/clipped_tanh/forward/Tanh": IMAGINE,
    "transition_gru_3/MatMul": IMAGINE,        # the second transition call: the rollout's first step
    "KullbackLeibler/IndependentNormal_1_CONSTRUCTED_AT_top_level/KullbackLeibler_a/kl_normal_normal/sub": KL,
    "IndependentNormal_1/entropy/Normal_1/entropy/Log": KL,
    "gradient_tape/encoder_1/conv4_1/Conv2DBackpropFilter": f"grad {ENCODER}",
    "gradient_tape/scan/while/scan/while_grad/body/_5/gradient_tape/scan/while/gradients/AddN": f"grad {OBSERVE}",
    "gradient_tape/representation_out_1/MatMul": f"grad {OBSERVE}",
    "gradient_tape/decoder_1/deconv3_1/conv_transpose/Conv2D": f"grad {DECODER}",
    "gradient_tape/IndependentNormal_CONSTRUCTED_AT_decoder_1/log_prob/Tile": f"grad {DECODER}",
    "gradient_tape/value_3/hidden3_1/MatMul": f"grad {BEHAVIOUR_HEADS}",
    "gradient_tape/reward_1/hidden2_1/MatMul": f"grad {HEADS}",
    "gradient_tape/reward_3/hidden2_1/MatMul": f"grad {BEHAVIOUR_HEADS}",
    "gradient_tape/scan_1/while/scan_1/while_grad/body/_978/gradient_tape/scan_1/while/gradients/AddN":
        f"grad {IMAGINE}",
    "gradient_tape/transition_in_3/EluGrad": f"grad {IMAGINE}",
    "gradient_tape/actor_1/hidden2_1/MatMul": f"grad {IMAGINE}",
    "gradient_tape/KullbackLeibler/IndependentNormal_1_CONSTRUCTED_AT_top_level/mul": f"grad {KL}",
    "gradient_tape/strided_slice_7/StridedSliceGrad": GRAD_OTHER,
    "gradient_tape/transpose_5/transpose": GRAD_OTHER,
    "AddN_9": GRAD_OTHER,
    "AddN_12/tmp_var_accum_3": GRAD_OTHER,
    "cond/then/_1357/cond/model_opt/Add_10": OPTIMISER,
    "cond_2/then/_1563/cond_2/value_opt/ResourceApplyAdam": OPTIMISER,
    "cond/then/_1357/cond/AssignVariableOp": OPTIMISER,
    "global_norm_1/L2Loss_3": OPTIMISER,
    "IsFinite_2": OPTIMISER,
    "LogicalAnd": OPTIMISER,
    "model_opt_loss_scale/mul": OPTIMISER,
    "transpose_1": OTHER,
    "stack_5": OTHER,
    "stateful_normal/StatelessRandomNormalV2": OTHER,
    "Mean_3": OTHER,
    "sub": OTHER,
    "ArithmeticOptimizer/AddOpsRewrite_add_7": OTHER,
    "scan_2/while/body/_9/mul": OTHER,         # a third scan is not in the model
}


def test_part_mapping_scan():
    # The other calls of the same layers (in a real trace every call's ops are there).
    names = list(SCAN_NAMES) + ["transition_in_3/Elu", "transition_gru_1/MatMul"]
    mapper = PartMapper.for_config(configlib.load("debug"), names)
    assert configlib.load("debug").unroll is False
    got = {name: mapper(name) for name in SCAN_NAMES}
    assert got == SCAN_NAMES


def test_part_mapping_unrolled():
    # unroll=True, batch_length 3, horizon 2: transition calls 1..3 observe, 4..5 imagine;
    # actor calls 1..2 imagine, the 3rd (entropy) a head. Keras numbers the k-th call 2k - 1.
    config = configlib.load("debug", {"unroll": True, "batch_length": 3, "horizon": 2})
    transition = [f"transition_in_{n}/Elu" for n in (1, 3, 5, 7, 9)]
    actor = [f"actor_{n}/hidden1_1/Elu" for n in (1, 3, 5)]
    mapper = PartMapper.for_config(config, transition + actor + ["gradient_tape/transition_in_9/EluGrad"])
    assert [mapper(n) for n in transition] == [OBSERVE] * 3 + [IMAGINE] * 2
    assert [mapper(n) for n in actor] == [IMAGINE, IMAGINE, BEHAVIOUR_HEADS]
    assert mapper("gradient_tape/transition_in_5/EluGrad") == f"grad {OBSERVE}"
    assert mapper("gradient_tape/transition_in_7/EluGrad") == f"grad {IMAGINE}"
    assert mapper("TanhNormal_CONSTRUCTED_AT_actor_5/entropy/Log") == BEHAVIOUR_HEADS
    assert mapper("TanhNormal_CONSTRUCTED_AT_actor_3/sample_and_log_prob/Log") == IMAGINE
    # The ranks come from the names seen, not from the suffix arithmetic.
    shifted = PartMapper(3, 2, [f"transition_in_{n}/Elu" for n in (2, 4, 6, 8, 10)])
    assert [shifted(f"transition_in_{n}/Elu") for n in (2, 4, 6, 8, 10)] == [OBSERVE] * 3 + [IMAGINE] * 2


# --------------------------------------------------------------------------------------------
# The command line and the markdown file, with the profiler itself stubbed out.

def _fake_result():
    trace = profile.Trace(ops=[OpEvent(*e) for e in EVENTS], steps=2, span_ps=4000, step_ps=[2000, 2000],
                          threads={"tf_Compute": 2})
    result = profile.summarize(trace, PartMapper())
    result.update(machine={"cpu": "Test CPU", "cores": 2, "isa": ["avx2"], "onednn": True, "tensorflow": "2.x",
                           "intra_op_threads": 2, "inter_op_threads": 2, "load_average": 0.5},
                  env=profile.env_snapshot(), env_at_start=None, matmul_gflops=123.4, trace_file="t.xplane.pb",
                  untraced_step_seconds=1e-9, flops=None, process_cores_untraced=1.5, process_cores_traced=1.4)
    return result


def test_main_writes_and_appends(tmp_path, monkeypatch):
    calls = []

    def fake_profile(config, **kwargs):
        calls.append((config, kwargs))
        return _fake_result()

    monkeypatch.setattr(profile, "profile", fake_profile)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert profile.main(["--preset", "debug", "--set", "horizon=3", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert calls[0][0].horizon == 3 and calls[0][1]["steps"] == 2
    assert profile.main(["--preset", "debug", "--out", str(tmp_path), "--append", "--label", "second"],
                        env_at_start={k: "unset" for k in profile.ENV_KEYS}) == 0
    text = (tmp_path / "profile.md").read_text()
    assert text.count("# Where the train step's time goes") == 1
    assert text.count("\n## debug (") == 2
    assert "## debug (oneDNN on, ONEDNN_MAX_CPU_ISA=AVX2, horizon=3)" in text and "## debug (second)" in text
    assert "ONEDNN_MAX_CPU_ISA=AVX2 python scripts/profile_step.py --preset debug --set horizon=3 --steps 2" in text
    assert "**123.4 GFLOP/s**" in text and "**1.50 cores** in the untraced step, 1.40 in the traced" in text
    assert "| MatMul |  | 1 | 0.0 | 40.0% |" in text
    # Without --append the file is rewritten.
    assert profile.main(["--preset", "debug", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "profile.md").read_text().count("\n## debug (") == 1
