"""TanhNormal and OneHotDist against numpy formulas; the action head's initial std."""
import numpy as np
import tensorflow as tf

from dreamer_tf.models.distributions import OneHotDist, TanhNormal
from dreamer_tf.models.networks import ActionHead, Initializers

LOC = np.array([[0.3, -1.2, 2.0], [0.0, 0.5, -3.0]], np.float32)
SCALE = np.array([[1.0, 0.4, 2.5], [5.0, 0.1, 1.3]], np.float32)


def numpy_log_prob(y, loc, scale):
    """Change of variables in float64: log N(atanh y) - log(1 - y^2), summed over the last axis."""
    y = y.astype(np.float64)
    x = np.arctanh(y)
    normal = -0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)
    return np.sum(normal - np.log1p(-y**2), -1)


def test_log_prob_matches_change_of_variables():
    y = np.array([[0.1, -0.7, 0.95], [-0.999, 0.2, 0.5]], np.float32)
    got = TanhNormal(LOC, SCALE).log_prob(y).numpy()
    np.testing.assert_allclose(got, numpy_log_prob(y, LOC, SCALE), rtol=1e-4)


def test_log_prob_finite_and_accurate_near_bounds():
    y = np.array([[1 - 1e-7, -(1 - 1e-7), 1 - 1e-6], [1.0, -1.0, 0.0]], np.float32)
    got = TanhNormal(LOC, SCALE).log_prob(y).numpy()
    assert np.all(np.isfinite(got))
    # Row 0 is representable (float32 rounds 1-1e-7 to 1-2^-23): the exact density of that value.
    np.testing.assert_allclose(got[0], numpy_log_prob(y[:1], LOC[:1], SCALE[:1])[0], rtol=1e-4)
    # Exactly +-1 is clipped to the largest float32 below 1.
    edge = np.float32(1) - np.float32(2**-24)
    clipped = np.array([[edge, -edge, 0.0]], np.float32)
    np.testing.assert_allclose(got[1], numpy_log_prob(clipped, LOC[1:], SCALE[1:])[0], rtol=1e-4)


def test_sample_is_reparameterised():
    loc = tf.constant(LOC)
    scale = tf.constant(SCALE)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([loc, scale])
        y = TanhNormal(loc, scale).sample(seed=(3, 4))
        total = tf.reduce_sum(y)
    eps = (np.arctanh(np.clip(y.numpy().astype(np.float64), -1 + 1e-12, 1 - 1e-12)) - LOC) / SCALE
    dy_dx = 1 - y.numpy().astype(np.float64) ** 2
    np.testing.assert_allclose(tape.gradient(total, loc).numpy(), dy_dx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tape.gradient(total, scale).numpy(), dy_dx * eps, rtol=1e-3, atol=1e-5)
    assert y.shape == LOC.shape and np.all(np.abs(y.numpy()) <= 1)


def test_sample_and_log_prob_finite_for_saturated_samples():
    dist = TanhNormal(np.zeros((1000, 2), np.float32), np.full((1000, 2), 20.0, np.float32))
    y, log_prob = dist.experimental_sample_and_log_prob(seed=(1, 2))
    assert np.any(np.abs(y.numpy()) == 1.0)  # some samples round to exactly +-1 ...
    assert np.all(np.isfinite(log_prob.numpy()))  # ... yet log_prob stays finite
    assert np.all(np.isfinite(dist.log_prob(y).numpy()))


def test_shapes():
    dist = TanhNormal(LOC, SCALE)
    assert dist.mode().shape == (2, 3)
    assert dist.batch_shape == (2,) and dist.event_shape == (3,)
    assert dist.sample(5, seed=(1, 1)).shape == (5, 2, 3)


def _log_density_x(x, loc, scale):
    """ln p(tanh x) in x-space up to a constant: ln N(x; loc, scale) + 2 ln cosh x (float64)."""
    return -0.5 * ((x - loc) / scale) ** 2 + 2 * (np.abs(x) + np.log1p(np.exp(-2 * np.abs(x))))


def test_mode_is_the_argmax_of_the_density():
    """Against a fine grid, over narrow, wide and near-critical (scale^2 ~ 1/2, two maxima merging)
    scales; compared in x = atanh(y) because float32 rounds saturated modes to exactly +-1."""
    from dreamer_tf.models.distributions import _tanh_normal_mode_x
    rng = np.random.default_rng(0)
    loc = np.concatenate([rng.uniform(-6, 6, 300), [0.0, 0.0, 0.01, 0.3, -0.2, 2.0, -1.0]])
    scale = np.concatenate([np.exp(rng.uniform(np.log(1e-3), np.log(8), 300)),
                            [0.7071, 0.70, 0.7071, 0.72, 0.69, 3.0, 0.1]])
    x = _tanh_normal_mode_x(tf.constant(loc, tf.float32), tf.constant(scale, tf.float32), 30).numpy()
    for l, s, xi in zip(loc, scale, x.astype(np.float64)):
        grid = np.linspace(min(l - 2 * s * s, -1) - 5, max(l + 2 * s * s, 1) + 5, 200001)
        density = _log_density_x(grid, l, s)
        best = grid[np.argmax(density)]
        assert _log_density_x(xi, l, s) >= density.max() - 1e-3, (l, s, xi, best)
        assert abs(np.tanh(xi) - np.tanh(best)) < 1e-3, (l, s, xi, best)
    y = TanhNormal(loc[None].astype(np.float32), scale[None].astype(np.float32)).mode().numpy()[0]
    np.testing.assert_allclose(y, np.tanh(x), atol=1e-6)
    # Hand cases: narrow -> tanh(loc); wide -> the bound on loc's side; wide and centred -> a bound.
    narrow, wide = TanhNormal([[0.5, -0.5]], [[0.01, 0.01]]), TanhNormal([[0.5, -0.5]], [[4.0, 4.0]])
    np.testing.assert_allclose(narrow.mode().numpy(), np.tanh([[0.5, -0.5]]), atol=1e-4)
    np.testing.assert_allclose(wide.mode().numpy(), [[1.0, -1.0]], atol=1e-6)
    assert abs(TanhNormal([[0.0]], [[5.0]]).mode().numpy()[0, 0]) > 0.999999


def test_entropy_matches_numerical_integral():
    loc = np.array([[0.4], [-1.0]], np.float32)
    scale = np.array([[0.7], [2.0]], np.float32)
    got = TanhNormal(loc, scale).entropy(seed=(5, 6), sample_count=20000).numpy()
    # H[y] = -int p_x(x) log p_y(tanh x) dx on a fine grid, float64.
    want = []
    for m, s in zip(loc[:, 0].astype(np.float64), scale[:, 0].astype(np.float64)):
        x = np.linspace(m - 12 * s, m + 12 * s, 400001)
        p = np.exp(-0.5 * ((x - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))
        log_py = np.log(p) - 2 * (np.log(2) - x - np.logaddexp(0, -2 * x))
        want.append(-np.trapezoid(p * log_py, x))
    np.testing.assert_allclose(got, want, atol=0.02)
    assert got.shape == (2,)


def test_action_head_initial_std_and_mean_squash():
    head = ActionHead(3, 2, 8, "elu", Initializers(0), init_std=5.0, min_std=1e-4)
    feat = tf.ones([4, 6])
    head(feat)
    head.out.kernel.assign(tf.zeros_like(head.out.kernel))  # raw outputs = bias = 0
    dist = head(feat)
    np.testing.assert_allclose(dist.scale.numpy(), 5.0 + 1e-4, rtol=1e-5)
    np.testing.assert_allclose(dist.loc.numpy(), 0.0)
    head.out.bias.assign(tf.constant([100.0, -100.0, 2.0, 0, 0, 0]))
    np.testing.assert_allclose(head(feat).loc.numpy()[0], 5 * np.tanh(np.array([100.0, -100.0, 2.0]) / 5), rtol=1e-5)


def test_onehot_straight_through_gradient_equals_probs_gradient():
    logits = tf.constant([[0.2, -1.0, 1.5, 0.0], [2.0, 0.1, -0.3, 0.7]])
    weights = tf.constant([[1.0, 2.0, -3.0, 0.5], [0.3, -1.0, 2.0, 4.0]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        dist = OneHotDist(logits=logits)
        sample = dist.sample(seed=(7, 8))
        through_sample = tf.reduce_sum(weights * sample)
        through_probs = tf.reduce_sum(weights * tf.nn.softmax(logits))
    value = sample.numpy()
    assert np.all((value == 0) | (value == 1)) and np.all(value.sum(-1) == 1)
    np.testing.assert_allclose(tape.gradient(through_sample, logits).numpy(),
                               tape.gradient(through_probs, logits).numpy(), rtol=1e-6)
    assert np.any(tape.gradient(through_sample, logits).numpy() != 0)


def test_onehot_mode_and_log_prob():
    logits = np.array([[0.2, -1.0, 1.5], [2.0, 0.1, -0.3]], np.float32)
    dist = OneHotDist(logits=logits)
    np.testing.assert_array_equal(dist.mode().numpy(), [[0, 0, 1], [1, 0, 0]])
    onehot = np.eye(3, dtype=np.float32)[[1, 2]]
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(dist.log_prob(onehot).numpy(), [log_softmax[0, 1], log_softmax[1, 2]], rtol=1e-5)
    assert dist.sample(4, seed=(1, 2)).dtype == tf.float32
