"""RSSM shapes, sampling, unrolled vs. scanned loops, networks' shapes."""
import numpy as np
import pytest
import tensorflow as tf

from dreamer_tf.models.networks import ConvDecoder, ConvEncoder, DenseHead, Initializers
from dreamer_tf.models.rssm import RSSM

B, T, E, A, S, D = 3, 5, 12, 2, 4, 6


def make_rssm(unroll=False, seed=0):
    rssm = RSSM(stoch_size=S, deter_size=D, hidden_size=7, init=Initializers(seed),
                rng=tf.random.Generator.from_seed(seed), unroll=unroll)
    rssm.observe(tf.zeros([1, 1, E]), tf.zeros([1, 1, A]))  # build
    return rssm


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return (tf.constant(rng.normal(size=(B, T, E)), tf.float32), tf.constant(rng.uniform(-1, 1, (B, T, A)), tf.float32),
            tf.constant(rng.normal(size=(T, B, S)), tf.float32), tf.constant(rng.normal(size=(T, B, S)), tf.float32))


def test_observe_shapes_and_sampling(inputs):
    embed, action, noise, prior_noise = inputs
    rssm = make_rssm()
    post, prior = rssm.observe(embed, action, noise=noise, prior_noise=prior_noise)
    for state in (post, prior):
        assert {k: tuple(v.shape) for k, v in state.items()} == dict(mean=(B, T, S), std=(B, T, S),
                                                                     stoch=(B, T, S), deter=(B, T, D))
        assert np.all(state["std"].numpy() > 0.1)  # softplus(x) + 0.1
    # stoch = mean + std * noise with the given (time-major) noise.
    np.testing.assert_allclose(post["stoch"].numpy(),
                               post["mean"].numpy() + post["std"].numpy() * np.transpose(noise, (1, 0, 2)), rtol=1e-5)
    np.testing.assert_allclose(prior["stoch"].numpy(),
                               prior["mean"].numpy() + prior["std"].numpy() * np.transpose(prior_noise, (1, 0, 2)),
                               rtol=1e-5)
    np.testing.assert_array_equal(post["deter"].numpy(), prior["deter"].numpy())  # posterior shares h_t
    assert rssm.get_feat(post).shape == (B, T, S + D)
    assert rssm.get_dist(post).event_shape == (S,)


def test_observe_matches_manual_steps(inputs):
    embed, action, noise, prior_noise = inputs
    rssm = make_rssm()
    post, _ = rssm.observe(embed, action, noise=noise, prior_noise=prior_noise)
    state = rssm.initial(B)
    for t in range(T):
        state, _ = rssm.obs_step(state, action[:, t], embed[:, t], noise[t], prior_noise[t])
        np.testing.assert_allclose(state["deter"].numpy(), post["deter"][:, t].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["stoch"].numpy(), post["stoch"][:, t].numpy(), rtol=1e-5, atol=1e-6)


def test_unrolled_equals_scan(inputs):
    embed, action, noise, prior_noise = inputs
    scanned, unrolled = make_rssm(False), make_rssm(True)
    for a, b in zip(scanned.weights, unrolled.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # same seed -> same weights
    fn = lambda r: tf.function(lambda: r.observe(embed, action, noise=noise, prior_noise=prior_noise))()  # noqa: E731
    post_s, prior_s = fn(scanned)
    post_u, prior_u = fn(unrolled)
    for k in post_s:
        np.testing.assert_allclose(post_s[k].numpy(), post_u[k].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(prior_s[k].numpy(), prior_u[k].numpy(), rtol=1e-5, atol=1e-6)
    init = {k: v[:, -1] for k, v in post_s.items()}
    img_s = scanned.imagine(action, init, noise=noise)
    img_u = unrolled.imagine(action, init, noise=noise)
    assert img_s["stoch"].shape == (B, T, S)
    np.testing.assert_allclose(img_s["stoch"].numpy(), img_u["stoch"].numpy(), rtol=1e-5, atol=1e-6)


def test_imagine_uses_prior_only(inputs):
    embed, action, noise, _ = inputs
    rssm = make_rssm()
    start = rssm.initial(B)
    prior = rssm.imagine(action[:, :2], start, noise=noise[:2])
    first = rssm.img_step(start, action[:, 0], noise[0])
    np.testing.assert_allclose(prior["mean"][:, 0].numpy(), first["mean"].numpy(), rtol=1e-6)


def test_seeded_weights_differ_by_seed():
    a, b, c = make_rssm(seed=1), make_rssm(seed=1), make_rssm(seed=2)
    np.testing.assert_array_equal(a.transition_gru.kernel.numpy(), b.transition_gru.kernel.numpy())
    assert not np.allclose(a.transition_gru.kernel.numpy(), c.transition_gru.kernel.numpy())


def test_bad_rank_raises():
    rssm = make_rssm()
    with pytest.raises(ValueError, match="embed"):
        rssm.observe(tf.zeros([B, E]), tf.zeros([B, T, A]))


def test_encoder_decoder_heads_shapes():
    init = Initializers(0)
    enc, dec = ConvEncoder(4, "relu", init), ConvDecoder(4, "relu", init)
    image = tf.zeros([2, 3, 64, 64, 3], tf.uint8)
    embed = enc(image)
    assert embed.shape == (2, 3, 32 * 4) and enc.embed_size == 128
    dist = dec(tf.zeros([2, 3, 10]))
    assert dist.batch_shape == (2, 3) and dist.event_shape == (64, 64, 3)
    # Unit-variance Gaussian pixels: log_prob(mean) = -0.5 log(2 pi) per pixel.
    np.testing.assert_allclose(dist.log_prob(dist.mean()).numpy(), -0.5 * np.log(2 * np.pi) * 64 * 64 * 3, rtol=1e-5)
    reward = DenseHead((), 2, 8, "elu", init, name="reward")
    assert reward(tf.zeros([2, 3, 10])).log_prob(tf.zeros([2, 3])).shape == (2, 3)
    assert len(reward.hidden) == 2
