"""Oracle tests: the assembled losses, the collector and the exploration noise against closed forms,
numpy re-computations and seeded statistical tests (each with a power check: the same test
rejects a wrong parameter)."""
import contextlib
import itertools
import math
import time
from types import SimpleNamespace as NS

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from dreamer_tf import config
from dreamer_tf.agent import Dreamer, behavior, explore, inputs
from dreamer_tf.agent.world_model import WorldModel, world_model_loss
from dreamer_tf.models import RSSM, ConvDecoder, DenseHead, Initializers
from dreamer_tf.run.collect import Collector
from dreamer_tf.run.learner import Learner
from dreamer_tf.run.logger import Stopwatch
from dreamer_tf.run.loop import Trainer

tfd = tfp.distributions
LOG_2PI = np.log(2 * np.pi)


# =============================== world-model loss ===============================================
B, T, D, DETER = 2, 3, 2, 3
DECODER_MEAN = np.array([0.1, -0.2, 0.3], np.float32)  # per colour channel
REWARD_MEAN, PCONT_LOGIT = 0.7, 1.2
KL_TARGETS = np.array([[1.0, 7.0, 1.0], [7.0, 1.0, 7.0]])  # per (b, t); mean 4


def gaussian_kl(mean_p, std_p, mean_q, std_q):
    """KL(N(mean_p, std_p^2) || N(mean_q, std_q^2)) summed over the last axis (float64)."""
    return np.sum(np.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5, -1)


def kl_states():
    """Posterior and prior parameters [B, T, D] whose KL (summed over D) is exactly KL_TARGETS."""
    rng = np.random.default_rng(0)
    prior_mean = rng.normal(size=(B, T, D))
    prior_std = rng.uniform(0.8, 1.25, (B, T, D))
    post_std = rng.uniform(0.8, 1.25, (B, T, D))
    post_mean = prior_mean.copy()
    post_mean[..., 1] += rng.normal(0, 0.1, (B, T))
    base = gaussian_kl(post_mean, post_std, prior_mean, prior_std)  # the KL without dimension 0's shift
    assert np.all(base < KL_TARGETS)
    post_mean[..., 0] += np.sqrt(2 * prior_std[..., 0] ** 2 * (KL_TARGETS - base))
    np.testing.assert_allclose(gaussian_kl(post_mean, post_std, prior_mean, prior_std), KL_TARGETS)
    return post_mean, post_std, prior_mean, prior_std


class Spy:
    """Delegates to a module and records its inputs."""

    def __init__(self, module):
        self.module, self.inputs = module, []

    def __call__(self, x):
        self.inputs.append(x)
        return self.module(x)


class FakeRSSM:
    """`observe` returns the given posterior and prior and records what it was given."""
    get_feat = staticmethod(RSSM.get_feat)

    def __init__(self, post, prior):
        self.post, self.prior, self.calls = post, prior, []

    def observe(self, embed, action):
        self.calls.append((embed, action))
        return self.post(), self.prior


def constant_decoder():
    """A real ConvDecoder whose mean is DECODER_MEAN at every pixel: all kernels and biases zero
    but the last bias."""
    decoder = ConvDecoder(1, "relu", Initializers(0))
    decoder(tf.zeros([1, D + DETER]))
    for layer in [decoder.project] + decoder.deconvs:
        layer.kernel.assign(tf.zeros_like(layer.kernel))
        layer.bias.assign(tf.zeros_like(layer.bias))
    decoder.deconvs[-1].bias.assign(DECODER_MEAN)
    return decoder


def constant_head(value, dist="normal"):
    head = DenseHead((), 2, 8, "elu", Initializers(1), dist=dist)
    head(tf.zeros([1, D + DETER]))
    head.out.kernel.assign(tf.zeros_like(head.out.kernel))
    head.out.bias.assign([value])
    return head


def wm_case(pcont=False):
    rng = np.random.default_rng(1)
    post_mean, post_std, prior_mean, prior_std = kl_states()
    mean_var = tf.Variable(post_mean.astype(np.float32))
    stoch = rng.normal(size=(B, T, D)).astype(np.float32)
    deter = rng.normal(size=(B, T, DETER)).astype(np.float32)

    def post():  # built from the variable inside the tape
        return dict(mean=tf.identity(mean_var), std=tf.constant(post_std, tf.float32), stoch=stoch, deter=deter)

    prior = dict(mean=tf.constant(prior_mean, tf.float32), std=tf.constant(prior_std, tf.float32),
                 stoch=tf.zeros_like(stoch), deter=deter)
    embed = tf.fill([B, T, 7], 0.25)
    encoder = Spy(lambda image: embed)
    rssm = FakeRSSM(post, prior)
    decoder, reward = Spy(constant_decoder()), Spy(constant_head(REWARD_MEAN))
    pcont_head = Spy(constant_head(PCONT_LOGIT, "binary")) if pcont else None
    model = WorldModel(encoder=encoder, rssm=rssm, reward=reward, decoder=decoder, pcont=pcont_head)
    discount = np.ones((B, T), np.float32)
    discount[0, -1] = 0.0
    data = dict(image=tf.constant(rng.integers(0, 256, (B, T, 64, 64, 3)), tf.uint8),
                action=tf.constant(rng.uniform(-1, 1, (B, T, 2)), tf.float32),
                reward=tf.constant(2 * rng.normal(size=(B, T)), tf.float32),
                discount=tf.constant(discount))
    return NS(model=model, data=data, mean_var=mean_var, post_mean=post_mean, post_std=post_std,
              prior_mean=prior_mean, prior_std=prior_std, stoch=stoch, deter=deter, embed=embed)


def image_log_likelihood_numpy(image):
    x = image.astype(np.float64) / 255.0 - 0.5
    return np.mean(np.sum(-0.5 * (x - DECODER_MEAN) ** 2 - 0.5 * LOG_2PI, (2, 3, 4)))


@pytest.mark.parametrize("free_nats, clip_rewards", [(3.0, "none"), (5.0, "tanh"), (0.0, "none")])
def test_world_model_loss_against_closed_form(free_nats, clip_rewards):
    """loss = kl_scale * max(mean_bt sum_d KL, free_nats) - mean ln N(image; mean, 1) - mean ln N(r; mean, 1).

    KL per (b, t) is 1 or 7 (mean 4): with free nats 3 clipping the batch mean gives 4, clipping
    per element would give 5, and averaging over dimensions instead of summing 2 -> 3."""
    kl_scale = 0.5
    case = wm_case()
    with tf.GradientTape() as tape:
        loss, post, metrics = world_model_loss(case.model, case.data, kl_scale=kl_scale, free_nats=free_nats,
                                               clip_rewards=clip_rewards)
    kl = gaussian_kl(case.post_mean, case.post_std, case.prior_mean, case.prior_std)
    assert np.mean(np.maximum(kl, 3.0)) - max(np.mean(kl), 3.0) == pytest.approx(1.0)  # the case discriminates
    image_ll = image_log_likelihood_numpy(case.data["image"].numpy())
    reward = case.data["reward"].numpy().astype(np.float64)
    target = np.tanh(reward) if clip_rewards == "tanh" else reward
    reward_ll = np.mean(-0.5 * (target - REWARD_MEAN) ** 2 - 0.5 * LOG_2PI)
    want = kl_scale * max(kl.mean(), free_nats) - image_ll - reward_ll
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), kl.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["image_loss"]), -image_ll, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["reward_loss"]), -reward_ll, rtol=1e-6)
    entropy = lambda std: np.mean(np.sum(0.5 * np.log(2 * np.pi * np.e * std**2), -1))  # noqa: E731
    np.testing.assert_allclose(float(metrics["post_ent"]), entropy(case.post_std), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["prior_ent"]), entropy(case.prior_std), rtol=1e-6)
    # Wiring: the encoder sees the images, observe the embedding and the actions, every head the
    # posterior features concat(stoch, deter).
    np.testing.assert_array_equal(case.model.encoder.inputs[0], case.data["image"])
    (embed, action), = case.model.rssm.calls
    assert embed is case.embed and action is case.data["action"]
    feat = np.concatenate([case.stoch, case.deter], -1)
    for head in (case.model.decoder, case.model.reward):
        (x,) = head.inputs
        np.testing.assert_array_equal(x, feat)
    # The KL gradient reaches the posterior only when the batch-mean KL is above free nats, and then
    # for every element (per-element clipping would leave the KL = 1 elements without).
    grad = tape.gradient(loss, case.mean_var).numpy()
    dkl = (case.post_mean - case.prior_mean) / case.prior_std**2 / (B * T)
    np.testing.assert_allclose(grad, kl_scale * dkl if kl.mean() > free_nats else 0 * dkl, rtol=1e-5, atol=1e-7)


def test_world_model_loss_with_continuation_head():
    """+ pcont_scale * mean Bernoulli NLL of the soft labels discount * gamma (0 at terminals)."""
    case = wm_case(pcont=True)
    gamma, pcont_scale = 0.9, 10.0
    loss, _, metrics = world_model_loss(case.model, case.data, kl_scale=1.0, free_nats=3.0, discount=gamma,
                                        pcont_scale=pcont_scale)
    kl = gaussian_kl(case.post_mean, case.post_std, case.prior_mean, case.prior_std).mean()
    p = 1 / (1 + np.exp(-PCONT_LOGIT))
    label = case.data["discount"].numpy() * gamma
    pcont_ll = np.mean(label * np.log(p) + (1 - label) * np.log(1 - p))
    reward_ll = np.mean(-0.5 * (case.data["reward"].numpy() - REWARD_MEAN) ** 2 - 0.5 * LOG_2PI)
    want = max(kl, 3.0) - image_log_likelihood_numpy(case.data["image"].numpy()) - reward_ll \
        - pcont_scale * pcont_ll
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["pcont_loss"]), -pcont_scale * pcont_ll, rtol=1e-5)


# =============================== actor and value losses =========================================
H, N = 5, 3
LAMBDA, GAMMA = 0.8, 0.9


def imagined_features(seed=0):
    """[H, N, 3]: channel 0 the reward mean, 1 the value mean, 2 the continuation probability."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.normal(size=(H, N)), 3 * rng.normal(size=(H, N)), rng.uniform(0.3, 1.0, (H, N))], -1)


def fake_heads(value_scale=None):
    """Heads reading their means off the features (value scaled by an optional variable)."""
    reward = lambda f: tfd.Independent(tfd.Normal(f[..., 0], 1.0), 0)  # noqa: E731
    scale = 1.0 if value_scale is None else value_scale
    value = lambda f: tfd.Independent(tfd.Normal(scale * f[..., 1], 1.0), 0)  # noqa: E731
    pcont = lambda f: tfd.Independent(tfd.Bernoulli(probs=f[..., 2], dtype=tf.float32), 0)  # noqa: E731
    return reward, value, pcont


def lambda_returns_numpy(r, v, p, lam):
    """Eq. 6 of the paper, from the n-step returns, per imagined state tau = 0..H-2:
    V_N^k(tau) = sum_{j<k} (prod_{i<j} p[tau+i]) r[tau+j] + (prod_{i<k} p[tau+i]) v[tau+k],
    V_lambda(tau) = (1 - lam) sum_{n=1}^{K-1} lam^(n-1) V_N^n + lam^(K-1) V_N^K with K = H-1-tau."""
    h = r.shape[0]
    out = np.zeros((h - 1,) + r.shape[1:])
    for tau in range(h - 1):
        def n_step(k):
            disc = np.cumprod(np.concatenate([np.ones_like(p[:1]), p[tau:tau + k]], 0), 0)  # [k+1]
            return sum(disc[j] * r[tau + j] for j in range(k)) + disc[k] * v[tau + k]
        steps = h - 1 - tau
        out[tau] = (1 - lam) * sum(lam ** (n - 1) * n_step(n) for n in range(1, steps)) \
            + lam ** (steps - 1) * n_step(steps)
    return out


def weights_numpy(p):
    """w[tau] = prod_{i < tau} p[i], tau = 0..H-2."""
    return np.cumprod(np.concatenate([np.ones_like(p[:1]), p[:-2]], 0), 0)


def actor_loss_numpy(feat, pcont=True, weights=None):
    r, v = feat[..., 0], feat[..., 1]
    p = feat[..., 2] if pcont else np.full_like(r, GAMMA)
    w = weights_numpy(p) if weights is None else weights
    return -np.mean(w * lambda_returns_numpy(r, v, p, LAMBDA))


@pytest.mark.parametrize("with_pcont", [True, False])
def test_imagined_returns_and_actor_loss_against_numpy(with_pcont):
    """reward[t], pcont[t] and value[t+1] line up (bootstrap value[-1]), the weights are the
    cumulative continuation (stop-gradient), and the actor gradient flows through the returns."""
    feat64 = imagined_features()
    feat = tf.Variable(feat64.astype(np.float32))
    reward, value, pcont = fake_heads()
    with tf.GradientTape() as tape:
        returns, weights = behavior.imagined_returns(reward, value, pcont if with_pcont else None, feat,
                                                     GAMMA, LAMBDA)
        loss = behavior.actor_loss(returns, weights)
    r, v = feat64[..., 0], feat64[..., 1]
    p = feat64[..., 2] if with_pcont else np.full_like(r, GAMMA)
    np.testing.assert_allclose(returns.numpy(), lambda_returns_numpy(r, v, p, LAMBDA), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(weights.numpy(), weights_numpy(p), rtol=1e-6)
    np.testing.assert_allclose(float(loss), actor_loss_numpy(feat64, with_pcont), rtol=1e-5)
    # Gradient: finite differences of the numpy loss with the weights held fixed (stop-gradient).
    grad = tape.gradient(loss, feat).numpy()
    fixed = weights_numpy(p)
    numeric = np.zeros_like(feat64)
    full = np.zeros_like(feat64)
    step = 1e-6
    for index in np.ndindex(feat64.shape):
        up, down = feat64.copy(), feat64.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (actor_loss_numpy(up, with_pcont, fixed)
                          - actor_loss_numpy(down, with_pcont, fixed)) / (2 * step)
        full[index] = (actor_loss_numpy(up, with_pcont) - actor_loss_numpy(down, with_pcont)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)
    if with_pcont:  # differentiating through the weights would give another gradient
        assert np.abs(full - numeric).max() > 1e-3


def test_value_loss_against_numpy():
    """-mean(w ln N(V_lambda; v(s_tau), 1)) over tau = 0..H-2, with the returns, the weights and
    the features stop-gradient'ed: only the value model's parameters get a gradient."""
    feat64 = imagined_features(1)
    feat = tf.Variable(feat64.astype(np.float32))
    scale = tf.Variable(1.0)
    reward, value, pcont = fake_heads(scale)
    with tf.GradientTape(persistent=True) as tape:
        returns, weights = behavior.imagined_returns(reward, value, pcont, feat, GAMMA, LAMBDA)
        loss = behavior.value_loss(value, feat, returns, weights)
    r, v, p = feat64[..., 0], feat64[..., 1], feat64[..., 2]
    ret, w = lambda_returns_numpy(r, v, p, LAMBDA), weights_numpy(p)
    want = -np.mean(w * (-0.5 * (ret - v[:-1]) ** 2 - 0.5 * LOG_2PI))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert tape.gradient(loss, feat) is None
    # d/d scale of mean(w (V - scale v)^2 / 2) with V held fixed, at scale 1.
    np.testing.assert_allclose(float(tape.gradient(loss, scale)), -np.mean(w * (ret - v[:-1]) * v[:-1]), rtol=1e-4)
    # Power: with the returns' dependence on the value model the derivative would differ.
    full = -np.mean(w * (ret - v[:-1]) * (v[:-1] - (lambda_returns_numpy(r, 1.001 * v, p, LAMBDA) - ret) / 0.001))
    assert abs(full - float(tape.gradient(loss, scale))) > 1e-2


class ShiftRSSM:
    """img_step: stoch = action + 1, deter kept: the imagined chain counts steps from its start."""
    stoch_size, unroll = 2, False
    get_feat = staticmethod(RSSM.get_feat)

    def img_step(self, prev, action, noise):
        stoch = action + 1.0
        return dict(mean=stoch, std=tf.ones_like(stoch), stoch=stoch, deter=prev["deter"])


def copy_actor(feat):
    """Acts (almost deterministically) with the stochastic part of its input feature."""
    return tfd.Independent(tfd.Normal(feat[..., :2], 1e-5), 1)


@pytest.mark.parametrize("drop_last", [True, False])
def test_imagine_ahead_starts_and_alignment(drop_last):
    """Imagines from every posterior state, minus the last of each sequence with drop_last; returns
    s_1..s_H (not the start), each reached from the previous one with the actor's action."""
    b, t, horizon = 3, 4, 5
    codes = 10.0 * np.arange(b)[:, None] + np.arange(t)[None]  # start (b, t) -> 10 b + t
    post = dict(stoch=np.stack([codes, -codes], -1), mean=np.zeros((b, t, 2)), std=np.ones((b, t, 2)),
                deter=np.stack([codes, codes + 0.5, np.ones_like(codes)], -1))
    post = {k: tf.constant(v, tf.float32) for k, v in post.items()}
    feat, neg_log_prob = behavior.imagine_ahead(copy_actor, ShiftRSSM(), post, horizon,
                                                tf.random.Generator.from_seed(0), drop_last=drop_last)
    starts = codes[:, :-1] if drop_last else codes
    n = starts.size
    assert feat.shape == (horizon, n, 2 + 3) and neg_log_prob.shape == (horizon, n)
    starts = starts.reshape(-1)  # batch-major, as flatten_bt
    for h in range(horizon):
        np.testing.assert_allclose(feat[h, :, 0], starts + h + 1, atol=1e-3)
        np.testing.assert_allclose(feat[h, :, 1], -starts + h + 1, atol=1e-3)
        np.testing.assert_array_equal(feat[h, :, 2], starts)


@pytest.mark.parametrize("pcont", [True, False])
def test_agent_drops_last_start_exactly_with_continuation_head(monkeypatch, pcont):
    cfg = config.load("debug", {"pcont": pcont})
    agent = Dreamer(cfg, {"image": NS(shape=(64, 64, 3))}, NS(shape=(2,), low=-np.ones(2), high=np.ones(2)))
    calls, real = [], behavior.imagine_ahead

    def imagine_ahead(*args, **kwargs):
        feat, neg_log_prob = real(*args, **kwargs)
        calls.append((kwargs.get("drop_last"), feat.shape))
        return feat, neg_log_prob

    monkeypatch.setattr(behavior, "imagine_ahead", imagine_ahead)
    rng = np.random.default_rng(0)
    b, length = cfg.batch_size, cfg.batch_length
    batch = dict(image=rng.integers(0, 256, (b, length, 64, 64, 3), dtype=np.uint8),
                 action=rng.uniform(-1, 1, (b, length, 2)).astype(np.float32),
                 reward=rng.normal(size=(b, length)).astype(np.float32),
                 discount=np.ones((b, length), np.float32))
    agent._train(inputs.convert_batch(batch, agent.batch_spec))
    (drop_last, shape), = calls
    assert drop_last is pcont
    assert shape[:2] == (cfg.horizon, b * (length - 1) if pcont else b * length)


# =============================== collector and loop ===============================================
class FakeEnvs:
    """N environments with the `envs.Parallel` interface. Env i's episodes last lengths[i] steps;
    obs["state"] = [i, episode, t]; reward = 10 i + t; the discount is 0 after the last step of
    env 0's episodes (a terminal) and 1 otherwise (a time limit)."""

    def __init__(self, lengths):
        self.lengths = list(lengths)
        self.t = [0] * len(lengths)
        self.episode = [-1] * len(lengths)
        self.sent = []  # the actions of every step
        self.observation_space = {"image": NS(shape=(64, 64, 3)), "state": NS(shape=(3,))}
        self.action_space = NS(shape=(2,), low=-np.ones(2, np.float32), high=np.ones(2, np.float32))

    def __len__(self):
        return len(self.lengths)

    def _obs(self, i):
        return {"image": np.full((64, 64, 3), i, np.uint8),
                "state": np.array([i, self.episode[i], self.t[i]], np.float32)}

    def reset(self):
        return [self.reset_at(i) for i in range(len(self))]

    def reset_at(self, i):
        self.t[i] = 0
        self.episode[i] += 1
        return self._obs(i)

    def step(self, actions):
        assert len(actions) == len(self)
        self.sent.append(np.array(actions, np.float32))
        obs, rewards, dones, infos = [], [], [], []
        for i in range(len(self)):
            self.t[i] += 1
            done = self.t[i] == self.lengths[i]
            obs.append(self._obs(i))
            rewards.append(10.0 * i + self.t[i])
            dones.append(done)
            infos.append({"discount": 0.0 if done and i == 0 else 1.0})
        return obs, np.asarray(rewards, np.float32), np.asarray(dones, bool), infos

    def close(self):
        pass


def check_episode(episode, env, length, sent):
    """sent[k]: the action of the episode's k-th step."""
    state = episode["state"]
    assert len(episode["reward"]) == length + 1
    np.testing.assert_array_equal(state[:, 0], env)
    assert len(set(state[:, 1])) == 1  # one episode
    np.testing.assert_array_equal(state[:, 2], np.arange(length + 1))
    np.testing.assert_array_equal(episode["action"][0], 0)
    assert episode["reward"][0] == 0 and episode["discount"][0] == 1
    np.testing.assert_array_equal(episode["action"][1:], sent)  # action[t] led to obs[t]
    np.testing.assert_array_equal(episode["reward"][1:], 10.0 * env + np.arange(1, length + 1))
    np.testing.assert_array_equal(episode["discount"][1:-1], 1)
    assert episode["discount"][-1] == (0.0 if env == 0 else 1.0)
    assert np.all(episode["image"] == env)


def test_collector_episode_format_and_reset_flags():
    lengths = [3, 5]
    envs = FakeEnvs(lengths)
    collector = Collector(envs, envs.action_space, ["image", "state"])
    collector.reset()
    assert collector.at_boundary
    finished, start_step = [], [0, 0]
    for k in range(16):
        obs = collector.batch_obs()
        first = obs["state"][:, 2] == 0
        np.testing.assert_array_equal(obs["reset"], first)  # True exactly at first observations
        assert collector.at_boundary == bool(first.all())
        actions = np.stack([[i, k] for i in range(len(envs))]).astype(np.float32)
        for episode in collector.step(actions):
            env = int(episode["state"][0, 0])
            check_episode(episode, env, lengths[env], np.stack(envs.sent[start_step[env]:k + 1])[:, env])
            start_step[env] = k + 1
            finished.append(env)
    # Env 0 finishes at steps 3, 6, ..., env 1 at 5, 10, 15; in order of the step, then of the env.
    assert finished == [0, 1, 0, 0, 1, 0, 0, 1]


class StubReplay:
    def __init__(self):
        self.episodes = []

    @property
    def num_episodes(self):
        return len(self.episodes)

    def add(self, episode):
        self.episodes.append(episode)
        return f"/episodes/{len(self.episodes)}.npz"

    def windows(self, length):  # every stub episode is long enough to train on
        return NS(lengths=[length] * len(self.episodes))

    @contextlib.contextmanager
    def iterator(self, batch_size, length):
        yield itertools.repeat({})


class StubAgent:
    """Acts 0.5 everywhere; records what the loop gives it."""
    ACTION = 0.5

    def __init__(self):
        self.calls, self.updates = [], 0
        self.train_step_count = NS(numpy=lambda: self.updates)

    def policy(self, obs, state, training, **kwargs):
        self.calls.append(dict(reset=obs["reset"].copy(), t=obs["state"][:, 2].copy(), state=state,
                               training=training, env_step=kwargs.get("env_step")))
        return np.full((len(obs["reset"]), 2), self.ACTION, np.float32), {"call": len(self.calls)}

    def train(self, batch):
        self.updates += 1
        return {"model_nonfinite": 0.0, "actor_nonfinite": 0.0, "value_nonfinite": 0.0}


@pytest.mark.parametrize("prefill", [20, 22])
def test_loop_switches_from_random_to_policy_at_prefill(tmp_path, prefill):
    """Trainer._iteration with stub environments, agent and replay: random actions while step <
    prefill, then the policy (training mode) from exactly the first iteration at step >= prefill,
    with its state passed back and reset flags per env; no update before prefill, the `pretrain`
    updates right after its last random step."""
    cfg = config.load("debug", {"prefill": prefill})
    trainer = Trainer(cfg, tmp_path, tensorboard=False)
    envs = FakeEnvs([3, 5])
    trainer.act_space = envs.action_space
    trainer.collector = Collector(envs, envs.action_space, ["image", "state"])
    trainer.agent, trainer.replay, trainer.rng = StubAgent(), StubReplay(), np.random.default_rng(0)
    trainer._progress = NS(set=lambda **kwargs: None, update=lambda step: None)
    trainer._clock, trainer._watch, trainer._pending = (time.time(), 0, 0.0), Stopwatch(), []
    trainer.learner = Learner(trainer.agent, trainer.replay, cfg.batch_size, cfg.batch_length, trainer._check)
    trainer.acting = trainer.learner.acting(lambda: pytest.fail("no acting copy in the sequential loop"))
    s = trainer.state
    s.next_eval = s.next_ckpt = s.next_log = 10**9
    trainer.collector.reset()
    per_iteration = cfg.action_repeat * len(envs)
    first_policy = None
    for k in range(15):
        before, calls = s.step, len(trainer.agent.calls)
        trainer._iteration()
        assert s.step == before + per_iteration
        sent = envs.sent[-1]
        if s.step < prefill:
            assert trainer.agent.updates == 0
        elif before < prefill:  # prefill just completed: the `pretrain` updates
            assert trainer.agent.updates == cfg.pretrain
        if before < prefill:
            assert len(trainer.agent.calls) == calls
            assert np.all(np.abs(sent) <= 1) and not np.any(sent == StubAgent.ACTION)
        else:
            first_policy = k if first_policy is None else first_policy
            assert len(trainer.agent.calls) == calls + 1
            assert trainer.agent.calls[-1]["env_step"] in (None, before)  # the step the policy acts at
            np.testing.assert_array_equal(sent, StubAgent.ACTION)
    assert first_policy == -(-prefill // per_iteration)  # the first iteration starting at step >= prefill
    calls = trainer.agent.calls
    assert all(c["training"] for c in calls)
    assert calls[0]["state"] is None and [c["state"]["call"] for c in calls[1:]] == list(range(1, len(calls)))
    for c in calls:  # the reset flag is per env: True exactly at an episode's first observation
        np.testing.assert_array_equal(c["reset"], c["t"] == 0)
    assert any(c["reset"].any() and not c["reset"].all() for c in calls)
    assert trainer.agent.updates > 0
    # The stored episodes: the format above, random actions before prefill and the policy's after.
    assert len(trainer.replay.episodes) == sum(15 // n for n in envs.lengths)
    sent, done = np.stack(envs.sent), [0, 0]
    for episode in trainer.replay.episodes:
        env = int(episode["state"][0, 0])
        length = envs.lengths[env]
        check_episode(episode, env, length, sent[done[env] * length:(done[env] + 1) * length, env])
        done[env] += 1


# =============================== exploration ====================================================
SAMPLES = 200_000


def normal_cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def ks_statistic(samples, cdf):
    x = np.sort(samples)
    n = len(x)
    f = cdf(x)
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


KS_999 = 1.95  # sqrt(n) D exceeds it with probability 0.001 under the null (Kolmogorov distribution)
CHI2_3_999 = 16.27  # 99.9% quantile of chi-square with 3 degrees of freedom


def test_gaussian_exploration_std_and_clip():
    rng = tf.random.Generator.from_seed(7)
    amount = 0.3
    # At action 0 the clip at +-1 (3.3 std) is almost never active: the noise is N(0, amount^2).
    x = explore.explore(tf.zeros([SAMPLES // 2, 2]), "additive_gaussian", tf.constant(amount), rng, 2)
    x = x.numpy().reshape(-1)
    stat = lambda std: np.sqrt(x.size) * ks_statistic(x, lambda v: normal_cdf(v / std))  # noqa: E731
    assert stat(amount) < KS_999
    assert stat(1.1 * amount) > KS_999 and stat(amount / 1.1) > KS_999  # power
    # At action 0.8 the result is clipped to exactly 1 with probability P(z >= 0.2 / amount).
    y = explore.explore(tf.fill([SAMPLES, 1], 0.8), "additive_gaussian", tf.constant(amount), rng, 1).numpy()
    assert y.max() == 1.0 and y.min() >= -1.0
    frac = np.mean(y == 1.0)
    z = lambda std: abs(frac - (1 - normal_cdf(0.2 / std))) / np.sqrt(0.25 / SAMPLES)  # noqa: E731
    assert z(amount) < 4 and z(1.1 * amount) > 4
    inside = y[y < 1.0]  # below the bound the values are 0.8 + noise, unclipped
    assert ks_statistic(inside, lambda v: normal_cdf((v - 0.8) / amount) / normal_cdf(0.2 / amount)) \
        * np.sqrt(inside.size) < KS_999


def test_epsilon_greedy_frequency_and_uniform_random_actions():
    """With probability epsilon a uniform random one-hot action (which may be the greedy one)."""
    rng = tf.random.Generator.from_seed(8)
    epsilon, actions = 0.3, 4
    greedy = tf.one_hot(tf.fill([SAMPLES], 2), actions)
    out = explore.explore(greedy, "epsilon_greedy", tf.constant(epsilon), rng, actions).numpy()
    np.testing.assert_array_equal(out.sum(-1), 1)
    counts = np.bincount(out.argmax(-1), minlength=actions)

    def chi2(eps, weights=np.ones(actions)):
        probs = eps * weights / weights.sum()
        probs[2] += 1 - eps
        expected = SAMPLES * probs
        return np.sum((counts - expected) ** 2 / expected)

    assert chi2(epsilon) < CHI2_3_999
    assert chi2(1.1 * epsilon) > CHI2_3_999 and chi2(epsilon / 1.1) > CHI2_3_999  # power: epsilon
    assert chi2(epsilon, np.array([1.0, 1.0, 1.0, 1.2])) > CHI2_3_999  # power: uniformity
    none = explore.explore(greedy[:10], "none", tf.constant(epsilon), rng, actions)
    np.testing.assert_array_equal(none, greedy[:10])


def test_exploration_amount_decays_linearly_to_minimum():
    for step in (0, 1, 250, 500, 999, 1000, 5000):
        want = 0.4 + min(step / 1000, 1.0) * (0.1 - 0.4)
        assert float(explore.expl_amount(tf.constant(step, tf.int64), 0.4, 1000, 0.1)) == pytest.approx(want, abs=1e-6)
    assert float(explore.expl_amount(tf.constant(10**6), 0.3, 0, 0.0)) == pytest.approx(0.3)  # decay 0: constant


def test_exploration_amount_halving_schedule():
    """The reference's formula: max(minimum, amount * 0.5 ** (step / decay))."""
    for step in (0, 500, 1000, 3000, 10**6):
        want = max(0.05, 0.3 * 0.5 ** (step / 1000))
        got = float(explore.expl_amount(tf.constant(step, tf.int64), 0.3, 1000, 0.05, schedule="halving"))
        assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("balance", [0.8, 0.3])
def test_kl_balance_against_closed_form(balance):
    """DreamerV2's KL balancing alpha KL(sg(post) || prior) + (1 - alpha) KL(post || sg(prior)): the
    value is the KL (clipped at free nats per term), the prior's gradient is alpha times the plain
    KL's, the posterior's (1 - alpha) times; kl_balance 0 is the plain KL, value and gradients."""
    from dreamer_tf.agent.world_model import kl_loss
    post_mean, post_std, prior_mean, prior_std = kl_states()
    post_var, prior_var = tf.Variable(post_mean.astype(np.float32)), tf.Variable(prior_mean.astype(np.float32))
    dkl = (post_mean - prior_mean) / prior_std**2 / (B * T)  # d mean KL / d post mean (= -d / d prior mean)

    def run(balance, free_nats):
        with tf.GradientTape() as tape:
            post = dict(mean=post_var * 1.0, std=tf.constant(post_std, tf.float32))
            prior = dict(mean=prior_var * 1.0, std=tf.constant(prior_std, tf.float32))
            kl, clipped, _, _ = kl_loss(post, prior, free_nats, balance=balance)
        return float(kl), float(clipped), [g.numpy() for g in tape.gradient(clipped, [post_var, prior_var])]

    for free_nats in (0.0, 3.0):  # the mean KL is 4: above both
        kl, clipped, (g_post, g_prior) = run(balance, free_nats)
        np.testing.assert_allclose([kl, clipped], [KL_TARGETS.mean()] * 2, rtol=1e-6)
        np.testing.assert_allclose(g_post, (1 - balance) * dkl, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(g_prior, -balance * dkl, rtol=1e-4, atol=1e-7)
    _, clipped, grads = run(balance, 5.0)  # below free nats: both terms clipped, no gradient
    assert clipped == 5.0 and not any(np.any(g) for g in grads)
    kl, clipped, (g_post, g_prior) = run(0.0, 0.0)  # off: Dreamer v1's KL
    np.testing.assert_allclose(clipped, KL_TARGETS.mean(), rtol=1e-6)
    np.testing.assert_allclose(g_post, dkl, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g_prior, -dkl, rtol=1e-4, atol=1e-7)
    assert config.load().world_model.kl_balance == 0.0  # off by default


def test_actor_entropy_bonus_against_closed_form():
    """entropy_scale eta: actor loss -mean(w (V_lambda + eta H[pi(a|s)])), the entropy of the policy
    at the imagined states, time-major [H-1, N] (computed batch-major inside policy_entropy).
    Categorical policy: H = -sum p ln p, dH/dlogit_k = -p_k (ln p_k + H); eta 0 is the plain loss."""
    from dreamer_tf.models.distributions import OneHotDist
    rng = np.random.default_rng(3)
    logits64 = rng.normal(size=(2, 3, 4))  # [H-1, N, A]
    logits = tf.Variable(logits64.astype(np.float32))
    returns, weights = rng.normal(size=(2, 3)).astype(np.float32), rng.uniform(0.5, 1, (2, 3)).astype(np.float32)
    actor = lambda feat: OneHotDist(logits=feat)  # noqa: E731  (the features are the logits)
    eta, seed = 0.3, tf.constant([1, 2], tf.int32)
    with tf.GradientTape() as tape:
        loss = behavior.actor_loss(returns, weights, entropy=lambda: behavior.policy_entropy(
            actor, logits, seed, batch_axis=1), entropy_scale=eta)
    p = np.exp(logits64) / np.exp(logits64).sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(float(loss), -np.mean(weights * (returns + eta * entropy)), rtol=1e-5)
    want = -(eta * weights / weights.size)[..., None] * (-p * (np.log(p) + entropy[..., None]))
    np.testing.assert_allclose(tape.gradient(loss, logits).numpy(), want, rtol=1e-4, atol=1e-7)
    assert float(behavior.actor_loss(returns, weights)) == float(behavior.actor_loss(
        returns, weights, entropy=lambda: 1 / 0, entropy_scale=0.0))  # off: not even computed
    assert config.load().actor.entropy_scale == 0.0  # off by default
