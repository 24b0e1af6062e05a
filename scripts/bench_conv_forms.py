"""Each convolution of the image encoder and decoder, forward + backward, in Keras' form and in
exact alternative forms (the same sums in another order): time and share of the matmul peak
measured in the same process. The evidence behind the decoder's 1x1 layer as a matmul and behind
what the other layers would need (issue 15).

    python scripts/bench_conv_forms.py --preset paper --out results
    ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bench_conv_forms.py --preset paper --out results --append

Timed: the forward pass and the gradients a train step needs (weights, and the input too except
for the first encoder layer, whose input is pixels) for a fixed random output gradient, best of 3
after a warm-up call. Forms are described in their functions' docstrings. Zero-padding the 3
filters of the last layer to 8 or 16 was slower (0.5-0.7x in a trial), and with some graphs
TensorFlow 2.21's oneDNN layout pass aborts the process on it (a CHECK failure on a Pad feeding a
Conv2D), so it is not offered here.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

from dreamer_tf.utils import atomic_write_text, git_commit, import_tensorflow_quietly

tf = import_tensorflow_quietly()
import keras  # noqa: E402

from dreamer_tf import config as configlib  # noqa: E402
from dreamer_tf.models.networks import Conv2DTranspose  # noqa: E402
from dreamer_tf.study import bench  # noqa: E402


# --- alternative forms: f(x, kernel, bias, activation) with Keras' variables ------------------
def space_to_depth(x, w, b, act):
    """space-to-depth: a stride-1 conv with half the kernel over 2x2 pixel blocks (stride 2, even kernel)."""
    k, _, cin, cout = w.shape
    t = k // 2
    w = tf.reshape(tf.transpose(tf.reshape(w, [t, 2, t, 2, cin, cout]), [0, 2, 1, 3, 4, 5]), [t, t, 4 * cin, cout])
    return act(tf.nn.bias_add(tf.nn.conv2d(tf.nn.space_to_depth(x, 2), w, 1, "VALID"), b))


def patches(x, w, b, act):
    """patches + matmul: the receptive fields gathered by slices, then one matmul (small outputs)."""
    k, _, cin, cout = w.shape
    out = (x.shape[1] - k) // 2 + 1
    cols = tf.stack([x[:, 2 * i:2 * i + k, 2 * j:2 * j + k] for i in range(out) for j in range(out)], 1)
    y = tf.nn.bias_add(tf.matmul(tf.reshape(cols, [-1, k * k * cin]), tf.reshape(w, [-1, cout])), b)
    return tf.reshape(act(y), [-1, out, out, cout])


def subpixel(x, w, b, act):
    """sub-pixel: output pixel 2m + p sums taps k = 2j + p of input m - j, so the four phases of a
    stride-2 transposed conv are one stride-1 conv with 4x the filters, then depth_to_space."""
    k, _, cout, cin = w.shape
    taps = (k + 1) // 2
    w = tf.reverse(tf.pad(w, [[0, 2 * taps - k]] * 2 + [[0, 0]] * 2), [0, 1])
    w = tf.transpose(tf.concat([w[1 - p::2, 1 - q::2] for p in (0, 1) for q in (0, 1)], 2), [0, 1, 3, 2])
    pad = [[0, 0], [taps - 1, taps - 1], [taps - 1, taps - 1], [0, 0]]
    y = tf.nn.conv2d(tf.pad(x, pad), w, 1, "VALID")
    y = tf.nn.depth_to_space(act(tf.nn.bias_add(y, tf.tile(b, [4]))), 2)
    size = (x.shape[1] - 1) * 2 + k
    return y[:, :size, :size]


def channels_first(transposed):
    def form(x, w, b, act):
        """NCHW: channels first instead of NHWC, with the transposes in and out."""
        x = tf.transpose(x, [0, 3, 1, 2])
        if transposed:
            k, _, cout, _ = w.shape
            shape = tf.stack([tf.shape(x)[0], cout, (x.shape[2] - 1) * 2 + k, (x.shape[3] - 1) * 2 + k])
            y = tf.nn.conv2d_transpose(x, w, shape, 2, "VALID", data_format="NCHW")
        else:
            y = tf.nn.conv2d(x, w, 2, "VALID", data_format="NCHW")
        return act(tf.transpose(tf.nn.bias_add(y, b, data_format="NCHW"), [0, 2, 3, 1]))
    return form


def dreamer_tf_form(x, w, b, act):
    """dreamer_tf: its Conv2DTranspose, one matmul for a 1x1 input (what the train step runs)."""
    raise NotImplementedError  # measured as a layer of its own: see measure()


# --- measurement ---------------------------------------------------------------------------
def layers(depth: int) -> list[dict]:
    """The encoder's and decoder's convolutions (networks.ConvEncoder / ConvDecoder) and the forms tried."""
    enc, hw, cin = [], 64, 3
    for i, mult in enumerate((1, 2, 4, 8)):
        out = (hw - 4) // 2 + 1
        forms = {0: [space_to_depth, channels_first(False)], 2: [patches], 3: [patches]}.get(i, [])
        enc.append(dict(name=f"encoder conv{i + 1}", hw=hw, cin=cin, cout=depth * mult, kernel=4, transposed=False,
                        flops=2.0 * out * out * 16 * cin * depth * mult, input_grad=i > 0, forms=forms))
        hw, cin = out, depth * mult
    dec, hw, cin = [], 1, 32 * depth
    specs = ((4 * depth, 5, [dreamer_tf_form, subpixel]), (2 * depth, 5, [subpixel]), (depth, 6, [subpixel]),
             (3, 6, [subpixel, channels_first(True)]))
    for i, (cout, k, forms) in enumerate(specs):
        dec.append(dict(name=f"decoder deconv{i + 1}", hw=hw, cin=cin, cout=cout, kernel=k, transposed=True,
                        flops=2.0 * hw * hw * k * k * cin * cout, input_grad=True, forms=forms))
        hw, cin = (hw - 1) * 2 + k, cout
    return enc + dec


def _best_of(fn, x, repeats: int = 3) -> float:
    [t.numpy() for t in fn(x)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        [t.numpy() for t in fn(x)]
        times.append(time.perf_counter() - start)
    return min(times)


def measure(spec: dict, batch: int, peak: float) -> list[dict]:
    relu = spec["name"] != "decoder deconv4"
    cls = keras.layers.Conv2DTranspose if spec["transposed"] else keras.layers.Conv2D
    layer = cls(spec["cout"], spec["kernel"], strides=2, activation="relu" if relu else None)
    x = tf.random.normal([batch, spec["hw"], spec["hw"], spec["cin"]], seed=0)
    layer(x[:1])
    layer.bias.assign(tf.random.normal(layer.bias.shape, seed=1) * 0.1)
    act = tf.nn.relu if relu else tf.identity
    upstream = tf.random.normal(layer(x[:1]).shape[1:], seed=2)  # one non-uniform output gradient per image
    reference = layer(x[:8])

    def step(apply, variables):
        @tf.function
        def fn(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = apply(x)
            grads = tape.gradient(y, ([x] if spec["input_grad"] else []) + variables,
                                  output_gradients=tf.broadcast_to(upstream, tf.shape(y)))
            return [tf.convert_to_tensor(g) for g in grads]
        return fn

    flops = spec["flops"] * batch * (3 if spec["input_grad"] else 2)
    keras_seconds = _best_of(step(layer, [layer.kernel, layer.bias]), x)
    rows = [dict(form="Keras", seconds=keras_seconds, share=flops / keras_seconds / 1e9 / peak, diff=0.0)]
    for form in spec["forms"]:
        if form is dreamer_tf_form:
            ours = Conv2DTranspose(spec["cout"], spec["kernel"], strides=2, activation=layer.activation)
            ours(x[:1])
            ours.kernel.assign(layer.kernel)
            ours.bias.assign(layer.bias)
            apply, variables = ours, [ours.kernel, ours.bias]
        else:
            apply = lambda x, form=form: form(x, layer.kernel, layer.bias, act)  # noqa: E731
            variables = [layer.kernel, layer.bias]
        diff = float(tf.reduce_max(tf.abs(apply(x[:8]) - reference)))
        seconds = _best_of(step(apply, variables), x)
        rows.append(dict(form=form.__doc__.split(":")[0].strip(), seconds=seconds,
                         share=flops / seconds / 1e9 / peak, diff=diff))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args(argv)
    config = configlib.load(args.preset)
    batch = config.batch_size * config.batch_length
    peak = bench.matmul_peak(2048)
    machine = bench.machine_info()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    commit = git_commit(Path(__file__).resolve().parent.parent)
    command = " ".join(([f"ONEDNN_MAX_CPU_ISA={isa}"] if isa != "native" else [])
                       + ["python", "scripts/bench_conv_forms.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"## {args.preset} preset ({batch} images), oneDNN on, ONEDNN_MAX_CPU_ISA={isa}", "",
             f"Command: `{command}`; {datetime.datetime.now().isoformat(timespec='seconds')}, commit {commit}.",
             f"Machine: {machine['cpu']}, {machine['cores']} cores ({', '.join(machine['isa'])}); TensorFlow "
             f"{machine['tensorflow']}; load average at the start {machine['load_average']:.2f}; matmul peak measured "
             f"in the same process: **{peak:.1f} GFLOP/s**.", "",
             "| layer | in -> out | form | ms | of the matmul peak | vs Keras | max abs diff of the output |",
             "|---|---|---|---|---|---|---|"]
    for spec in layers(config.cnn_depth):
        rows = measure(spec, batch, peak)
        shape = f"{spec['hw']}x{spec['hw']}x{spec['cin']} -> {spec['cout']} (k{spec['kernel']})"
        for row in rows:
            lines.append(f"| {spec['name']} | {shape} | {row['form']} | {row['seconds'] * 1e3:.1f} | "
                         f"{row['share']:.0%} | {rows[0]['seconds'] / row['seconds']:.2f}x | {row['diff']:.1e} |")
            print(lines[-1], flush=True)
    path = args.out / "conv_forms.md"
    forms = {f.__doc__.split(":")[0].strip(): " ".join(f.__doc__.split(":", 1)[1].split())
             for spec in layers(config.cnn_depth) for f in spec["forms"]}
    header = ["# The encoder's and decoder's convolutions in exact alternative forms", "",
              "Made by `scripts/bench_conv_forms.py`: " + " ".join(__doc__.split("\n\n")[2].split()),
              "Each section is one process; compare rows only within a section. Max abs diff: the form's output "
              "against Keras' on 8 images (float32 rounding of reordered sums).", "", "Forms:",
              *[f"- **{name}**: {text}" for name, text in forms.items()], ""]
    text = (path.read_text() if args.append and path.exists() else "\n".join(header) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n".join(lines) + "\n\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
