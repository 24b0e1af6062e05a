"""The paper's other settings: contrastive / reward-only representations, discrete actions, pcont."""
from types import SimpleNamespace as NS

import numpy as np
import pytest
import tensorflow as tf

from dreamer_tf import config
from dreamer_tf.agent import Dreamer, behavior, inputs
from dreamer_tf.agent.world_model import contrastive_term, gaussian_log_prob_matrix, world_model_loss

OBS_SPACE = {"image": NS(shape=(64, 64, 3), dtype=np.uint8)}
BOX = NS(shape=(2,), low=-np.ones(2, np.float32), high=np.ones(2, np.float32))
DISCRETE = NS(n=4, shape=(), dtype=np.int64)


def make_batch(cfg, action_size=2, seed=0, onehot=False):
    rng = np.random.default_rng(seed)
    b, l = cfg.batch_size, cfg.batch_length
    if onehot:
        action = np.eye(action_size, dtype=np.float32)[rng.integers(0, action_size, (b, l))]
    else:
        action = rng.uniform(-1, 1, (b, l, action_size)).astype(np.float32)
    action[:, 0] = 0
    discount = np.ones((b, l), np.float32)
    discount[:, -2:] = 0.0  # episodes end (terminal) two steps before the end of each sequence
    return dict(image=rng.integers(0, 255, (b, l, 64, 64, 3), dtype=np.uint8), action=action,
                reward=rng.normal(size=(b, l)).astype(np.float32), discount=discount)


def numpy_gaussian_log_prob(x, mean, std):
    return np.sum(-0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi), -1)


def test_contrastive_term_matches_numpy():
    rng = np.random.default_rng(0)
    n, d = 5, 3
    stoch = rng.normal(size=(n, d))
    mean = stoch + 0.3 * rng.normal(size=(n, d))
    std = rng.uniform(0.2, 1.5, (n, d))
    matrix = np.array([[numpy_gaussian_log_prob(stoch[i], mean[j], std[j]) for j in range(n)] for i in range(n)])
    np.testing.assert_allclose(gaussian_log_prob_matrix(*(tf.constant(x, tf.float32) for x in (stoch, mean, std))),
                               matrix, rtol=1e-4)
    want = np.diag(matrix) - np.log(np.exp(matrix).sum(1))
    got = contrastive_term(*(tf.constant(x, tf.float32) for x in (stoch, mean, std))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.all(got <= 0)  # a log-probability of picking the right observation


@pytest.mark.slow
@pytest.mark.parametrize("representation, has_decoder, has_state_model", [
    ("reconstruction", True, False), ("contrastive", False, True), ("reward", False, False)])
def test_representation_variants_build_and_train(representation, has_decoder, has_state_model):
    cfg = config.load(preset="debug", overrides=dict(representation=representation))
    agent = Dreamer(cfg, OBS_SPACE, BOX)
    assert (agent.decoder is not None) == has_decoder
    assert (agent.state_model is not None) == has_state_model
    before = [v.numpy().copy() for v in agent.encoder.trainable_variables]
    metrics = agent.train(make_batch(cfg))
    assert all(np.isfinite(v) for v in metrics.values())
    assert ("contrastive_loss" in metrics) == has_state_model
    if not has_decoder:
        assert "image_loss" not in metrics  # a metric that does not apply is left out, not logged as 0.0
        with pytest.raises(ValueError, match="decoder"):
            agent.video_predictions(make_batch(cfg))
    # The encoder trains in every variant (through the posterior's KL, reward and contrastive terms).
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, agent.encoder.trainable_variables))


def test_contrastive_term_trains_state_model_and_encoder():
    cfg = config.load(preset="debug", overrides=dict(representation="contrastive", free_nats=1e6))
    agent = Dreamer(cfg, OBS_SPACE, BOX)
    data = inputs.convert_batch(make_batch(cfg), agent.batch_spec)
    with tf.GradientTape() as tape:
        loss, post, metrics = world_model_loss(agent.world_model, data, kl_scale=cfg.kl_scale,
                                               free_nats=cfg.free_nats)
    variables = agent.state_model.trainable_variables + agent.encoder.trainable_variables
    grads = tape.gradient(loss, variables)
    assert all(g is not None and np.any(g.numpy() != 0) for g in grads)
    # The reported term against numpy on the agent's own tensors: the posterior samples s_i of the
    # batch and the state model q(s | o_j) of every observation (the encoder is deterministic):
    # -mean_i [ln q(s_i | o_i) - ln sum_j q(s_i | o_j)].
    mean, std = (x.numpy().astype(np.float64).reshape(-1, cfg.stoch_size)
                 for x in agent.state_model(agent.encoder(data["image"])))
    stoch = post["stoch"].numpy().astype(np.float64).reshape(-1, cfg.stoch_size)
    matrix = np.array([[numpy_gaussian_log_prob(s, m, d) for m, d in zip(mean, std)] for s in stoch])
    logsumexp = matrix.max(1) + np.log(np.exp(matrix - matrix.max(1, keepdims=True)).sum(1))
    want = -np.mean(np.diag(matrix) - logsumexp)
    assert float(metrics["contrastive_loss"]) == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_discrete_actions_onehot_and_epsilon_greedy():
    cfg = config.load(preset="debug", overrides=dict(expl="epsilon_greedy", expl_amount=1.0))
    agent = Dreamer(cfg, OBS_SPACE, DISCRETE)
    assert agent.discrete and agent.action_size == 4
    metrics = agent.train(make_batch(cfg, action_size=4, onehot=True))
    assert np.isfinite(metrics["actor_loss"]) and metrics["actor_grad_norm"] > 0
    image = np.zeros((200, 64, 64, 3), np.uint8)
    action, _ = agent.policy({"image": image, "reset": np.ones(200, bool)}, None, training=True)
    assert action.shape == (200, 4)
    np.testing.assert_array_equal(action.sum(-1), 1.0)
    assert set(np.unique(action)) == {0.0, 1.0}
    assert len(np.unique(action.argmax(-1))) == 4  # epsilon 1: uniform random actions
    greedy, state = agent.policy({"image": image[:3], "reset": np.ones(3, bool)}, None, training=False)
    # Greedy = the one-hot argmax of the action model's logits (computed here, not by its mode()).
    latent = {k: state[k] for k in ("mean", "std", "stoch", "deter")}
    logits = agent.actor.trunk(agent.rssm.get_feat(latent)).numpy()
    np.testing.assert_array_equal(greedy, np.eye(4)[logits.argmax(-1)])


def test_action_space_mismatches_raise():
    with pytest.raises(ValueError, match="epsilon_greedy"):
        Dreamer(config.load(preset="debug", overrides=dict(expl="additive_gaussian")), OBS_SPACE, DISCRETE)
    with pytest.raises(ValueError, match="additive_gaussian"):
        Dreamer(config.load(preset="debug", overrides=dict(expl="epsilon_greedy")), OBS_SPACE, BOX)
    # `auto` picks the exploration that fits the action space.
    assert Dreamer(config.load(preset="debug"), OBS_SPACE, DISCRETE).expl == "epsilon_greedy"
    assert Dreamer(config.load(preset="debug"), OBS_SPACE, BOX).expl == "additive_gaussian"
    with pytest.raises(ValueError, match="action_dist"):
        Dreamer(config.load(preset="debug", overrides=dict(action_dist="onehot")), OBS_SPACE, BOX)


@pytest.mark.slow
def test_pcont_head_soft_labels_and_training():
    cfg = config.load(preset="debug", overrides=dict(pcont=True, discount=0.9))
    agent = Dreamer(cfg, OBS_SPACE, BOX)
    assert agent.pcont is not None and agent.pcont in agent.model_modules
    batch = make_batch(cfg)
    data = inputs.convert_batch(batch, agent.batch_spec)
    feat = tf.random.normal([cfg.batch_size, cfg.batch_length, cfg.stoch_size + cfg.deter_size], seed=1)
    logits = agent.pcont(feat).distribution.logits.numpy()
    label = batch["discount"] * 0.9  # 0 at terminals, gamma elsewhere
    p = 1 / (1 + np.exp(-logits))
    want = label * np.log(p) + (1 - label) * np.log(1 - p)
    np.testing.assert_allclose(agent.pcont(feat).log_prob(label).numpy(), want, rtol=1e-4, atol=1e-5)
    # Trains: the (scaled) continuation loss falls on a fixed batch.
    losses = [agent.train(batch)["pcont_loss"] for _ in range(25)]
    assert losses[-1] < 0.8 * losses[0]
    assert "discount" in agent.batch_spec and data["discount"].shape == (cfg.batch_size, cfg.batch_length)


def test_pcont_weights_imagined_returns():
    cfg = config.load(preset="debug", overrides=dict(pcont=True))
    agent = Dreamer(cfg, OBS_SPACE, BOX)
    feat = tf.random.normal([cfg.horizon, 6, cfg.stoch_size + cfg.deter_size], seed=2)
    returns, weights = behavior.imagined_returns(agent.reward, agent.value, agent.pcont, feat, cfg.discount,
                                                 cfg.disclam)
    pcont = agent.pcont(feat).mean().numpy()
    np.testing.assert_allclose(weights.numpy()[1], pcont[0], rtol=1e-6)  # w_1 = predicted continuation of s_0
    np.testing.assert_allclose(weights.numpy()[2], pcont[0] * pcont[1], rtol=1e-6)
    assert returns.shape == (cfg.horizon - 1, 6)
