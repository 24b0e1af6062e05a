"""lambda_return against hand-computed values and the paper's n-step definition (Eq. 6)."""
import numpy as np
import pytest
import tensorflow as tf

from dreamer_tf.agent.behavior import lambda_return

REWARD = np.array([[1.0, -2.0], [0.5, 3.0], [2.0, 0.0]], np.float32)  # [H=3, B=2]
VALUE = np.array([[10.0, 20.0], [4.0, -1.0], [6.0, 2.0]], np.float32)
BOOT = np.array([8.0, -5.0], np.float32)


def paper_lambda_return(reward, value, gamma, bootstrap, lam):
    """Eq. 6 with a constant gamma: V_lambda(t) = (1-lam) sum_{n=1}^{H-t-1} lam^(n-1) V_N^n + lam^(H-t-1) V_N^(H-t).

    V_N^n(t) = sum_{k<n} gamma^k r[t+k] + gamma^n v[t+n], with v[H] = bootstrap.
    """
    h = reward.shape[0]
    v = np.concatenate([value, bootstrap[None]], 0).astype(np.float64)
    out = np.zeros_like(reward, np.float64)
    for t in range(h):
        steps = h - t

        def n_step(n):
            return sum(gamma**k * reward[t + k] for k in range(n)) + gamma**n * v[t + n]

        out[t] = ((1 - lam) * sum(lam ** (n - 1) * n_step(n) for n in range(1, steps))
                  + lam ** (steps - 1) * n_step(steps))
    return out


def test_lambda_one_is_discounted_sum_plus_bootstrap():
    g = 0.9
    got = lambda_return(REWARD, VALUE, g, BOOT, 1.0).numpy()
    want0 = REWARD[0] + g * REWARD[1] + g**2 * REWARD[2] + g**3 * BOOT
    want2 = REWARD[2] + g * BOOT
    np.testing.assert_allclose(got[0], want0, rtol=1e-6)
    np.testing.assert_allclose(got[2], want2, rtol=1e-6)


def test_lambda_zero_is_one_step_td():
    g = 0.9
    got = lambda_return(REWARD, VALUE, g, BOOT, 0.0).numpy()
    next_value = np.concatenate([VALUE[1:], BOOT[None]], 0)
    np.testing.assert_allclose(got, REWARD + g * next_value, rtol=1e-6)


def test_discount_zero_gives_reward():
    got = lambda_return(REWARD, VALUE, 0.0, BOOT, 0.95).numpy()
    np.testing.assert_allclose(got, REWARD)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.95, 1.0])
def test_matches_paper_n_step_definition(lam):
    got = lambda_return(REWARD, VALUE, 0.99, BOOT, lam).numpy()
    np.testing.assert_allclose(got, paper_lambda_return(REWARD, VALUE, 0.99, BOOT, lam), rtol=1e-5)


def test_per_step_discount_by_hand():
    disc = np.array([[0.5, 1.0], [0.0, 0.9], [0.8, 0.7]], np.float32)
    lam = 0.5
    got = lambda_return(REWARD, VALUE, disc, BOOT, lam).numpy()
    # Backwards by hand: V2 = r2 + d2 * boot; V1 = r1 + d1 ((1-l) v2 + l V2); V0 = r0 + d0 ((1-l) v1 + l V1).
    v2 = REWARD[2] + disc[2] * BOOT
    v1 = REWARD[1] + disc[1] * ((1 - lam) * VALUE[2] + lam * v2)
    v0 = REWARD[0] + disc[0] * ((1 - lam) * VALUE[1] + lam * v1)
    np.testing.assert_allclose(got, np.stack([v0, v1, v2]), rtol=1e-6)
    # Column 0 has a terminal at t=1: V1 = r1 exactly.
    assert got[1, 0] == pytest.approx(REWARD[1, 0])


def test_dynamic_horizon_matches_static():
    fn = tf.function(lambda r, v, d, b: lambda_return(r, v, d, b, 0.7),
                     input_signature=[tf.TensorSpec([None, None])] * 3 + [tf.TensorSpec([None])])
    disc = np.full_like(REWARD, 0.9)
    np.testing.assert_allclose(fn(REWARD, VALUE, disc, BOOT).numpy(),
                               lambda_return(REWARD, VALUE, disc, BOOT, 0.7).numpy(), rtol=1e-6)


def test_gradient_flows_to_reward_and_value():
    r, v = tf.constant(REWARD), tf.constant(VALUE)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([r, v])
        out = tf.reduce_sum(lambda_return(r, v, 0.9, BOOT, 1.0)[0])
    np.testing.assert_allclose(tape.gradient(out, r).numpy(), [[1, 1], [0.9, 0.9], [0.81, 0.81]], rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(out, v).numpy(), np.zeros_like(VALUE))  # lambda 1: values unused


@pytest.mark.parametrize("kwargs, match", [
    (dict(value=VALUE[:2]), "value shape"),
    (dict(reward=REWARD[0]), "time-major"),
    (dict(discount=np.ones((2, 2), np.float32)), "discount"),
    (dict(bootstrap=np.ones(3, np.float32)), "bootstrap"),
    (dict(lambda_=1.5), "lambda_"),
])
def test_bad_input_raises_clear_error(kwargs, match):
    args = dict(reward=REWARD, value=VALUE, discount=0.9, bootstrap=BOOT, lambda_=0.9)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lambda_return(**args)
