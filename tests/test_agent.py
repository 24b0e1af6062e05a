"""The Dreamer agent: compiled train step, variable partition, guards, precision, policy, checkpoints."""
from types import SimpleNamespace as NS

import numpy as np
import pytest
import tensorflow as tf

from dreamer_tf import config
from dreamer_tf.agent import METRIC_KEYS, Dreamer, behavior, inputs
from dreamer_tf.agent.world_model import world_model_loss
from dreamer_tf.run.checkpoint import Checkpointer

OBS_SPACE = {"image": NS(shape=(64, 64, 3), dtype=np.uint8)}
ACT_SPACE = NS(shape=(2,), low=-np.ones(2, np.float32), high=np.ones(2, np.float32))
KL_ONLY = ["transition_hidden/kernel", "transition_hidden/bias", "transition_out/kernel", "transition_out/bias"]


def wm_loss(agent, data):
    c = agent.config
    return world_model_loss(agent.world_model, data, **c.world_model, discount=c.discount,
                            clip_rewards=c.clip_rewards)


def make_config(**overrides):
    return config.load(preset="debug", overrides=overrides)


def make_batch(cfg, seed=0, action_size=2):
    """Smooth, learnable frames: each sequence is a moving colour gradient; rewards follow actions."""
    rng = np.random.default_rng(seed)
    b, l = cfg.batch_size, cfg.batch_length
    xs = np.linspace(0, 1, 64)
    phase = rng.uniform(0, 1, (b, 1, 1, 1, 1)) + 0.1 * np.arange(l)[None, :, None, None, None]
    colour = rng.uniform(0.2, 1, (b, 1, 1, 1, 3))
    image = (255 * colour * (0.5 + 0.5 * np.sin(2 * np.pi * (xs[None, None, :, None, None] + phase)))).astype(np.uint8)
    image = np.broadcast_to(image, (b, l, 64, 64, 3)).copy()
    action = rng.uniform(-1, 1, (b, l, action_size)).astype(np.float32)
    action[:, 0] = 0
    reward = action.sum(-1).astype(np.float32)
    reward[:, 0] = 0
    return dict(image=image, action=action, reward=reward, discount=np.ones((b, l), np.float32))


def snapshot(variables):
    return [v.numpy().copy() for v in variables]


def changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


@pytest.fixture(scope="module")
def agent():
    return Dreamer(make_config(), OBS_SPACE, ACT_SPACE)


def test_train_metrics_and_no_retracing(agent):
    batch = make_batch(agent.config)
    for seed in range(3):
        metrics = agent.train(make_batch(agent.config, seed))
    assert set(METRIC_KEYS) <= set(metrics)
    assert all(type(v) is float and np.isfinite(v) for v in metrics.values())
    assert agent._train_fn.experimental_get_tracing_count() == 1
    # Tensors (not only numpy) are accepted without retracing.
    agent.train({k: tf.constant(v) for k, v in batch.items()})
    assert agent._train_fn.experimental_get_tracing_count() == 1
    assert int(agent.train_step_count.numpy()) == 4


@pytest.mark.parametrize("change, match", [
    (lambda b: b.pop("reward"), "missing key 'reward'"),
    (lambda b: b.update(image=b["image"].astype(np.float32)), "uint8"),
    (lambda b: b.update(action=b["action"][:, :-1]), r"batch\['action'\] has shape"),
])
def test_bad_batch_raises_clear_error(agent, change, match):
    batch = make_batch(agent.config)
    change(batch)
    with pytest.raises(ValueError, match=match):
        agent.train(batch)


def test_each_optimiser_changes_only_its_variables(agent):
    batch = make_batch(agent.config, seed=5)
    groups = dict(model=(agent.model_opt, agent.model_variables), actor=(agent.actor_opt, agent.actor_variables),
                  value=(agent.value_opt, agent.value_variables))
    lrs = {name: float(opt.learning_rate.numpy()) for name, (opt, _) in groups.items()}
    try:
        for active in groups:
            for name, (opt, _) in groups.items():
                opt.learning_rate.assign(lrs[name] if name == active else 0.0)
            before = {name: snapshot(v) for name, (_, v) in groups.items()}
            agent.train(batch)
            for name, (_, variables) in groups.items():
                still = [v.path for v, moved in zip(variables, changed(before[name], variables)) if not moved]
                if name != active:
                    assert len(still) == len(variables), f"{active} step changed {name} variables"
                elif name == "model":
                    # Only the prior's output layers may stay: they are reached through the KL alone,
                    # which sits below free nats at initialisation (zero gradient, zero Adam step).
                    assert set(still) <= set(KL_ONLY), still
                else:
                    assert not still, f"{active} step left {still} unchanged"
    finally:
        for name, (opt, _) in groups.items():
            opt.learning_rate.assign(lrs[name])


def test_actor_gradient_flows_through_dynamics_value_loss_does_not(agent):
    data = inputs.convert_batch(make_batch(agent.config, seed=1), agent.batch_spec)
    _, post, _ = wm_loss(agent, data)
    transition = agent.rssm.transition_gru.trainable_variables + agent.rssm.transition_out.trainable_variables
    others = agent.actor_variables + transition + agent.reward.trainable_variables + agent.value_variables
    with tf.GradientTape(persistent=True) as tape:
        feat, _ = behavior.imagine_ahead(agent.actor, agent.rssm, post, agent.config.horizon, agent.rng)
        returns, weights = behavior.imagined_returns(agent.reward, agent.value, None, feat,
                                                     agent.config.discount, agent.config.disclam)
        actor_loss = behavior.actor_loss(returns, weights)
        value_loss = behavior.value_loss(agent.value, feat, returns, weights)
    grads = tape.gradient(actor_loss, others)
    for v, g in zip(others, grads):
        assert g is not None and np.any(g.numpy() != 0), f"actor loss has no gradient for {v.path}"
    # The value loss reaches only the value model (stop-gradient features and targets).
    non_value = agent.actor_variables + agent.model_variables
    assert all(g is None for g in tape.gradient(value_loss, non_value))
    assert all(g is not None for g in tape.gradient(value_loss, agent.value_variables))
    # Start states are stop-gradient'ed: the actor loss does not reach the encoder or representation model.
    encoder_grads = tape.gradient(actor_loss, agent.encoder.trainable_variables
                                  + agent.rssm.representation_out.trainable_variables)
    assert all(g is None for g in encoder_grads)


def test_free_nats_clip_kl_gradient(agent):
    data = inputs.convert_batch(make_batch(agent.config, seed=2), agent.batch_spec)
    prior_vars = agent.rssm.transition_hidden.trainable_variables + agent.rssm.transition_out.trainable_variables
    for free_nats, expect_zero in ((1e6, True), (0.0, False)):
        agent.config = agent.config.replace(free_nats=free_nats)
        try:
            with tf.GradientTape() as tape:
                loss, _, metrics = wm_loss(agent, data)
        finally:
            agent.config = agent.config.replace(free_nats=3.0)
        grads = tape.gradient(loss, prior_vars)  # the prior's output layers are reached only through the KL
        nonzero = any(np.any(g.numpy() != 0) for g in grads)
        assert nonzero != expect_zero, free_nats
    assert float(metrics["kl"]) > 0


@pytest.mark.slow
def test_overfits_fixed_batch():
    """Sixty steps on one fixed batch lower the image, reward and model losses by far more than
    sampling noise moves them. The bound is not a measured loss: the control is the same agent
    with the world model's learning rate at 0, whose losses only fluctuate with the posterior and
    imagination samples; the learner's last ten losses must lie below the control's by more than
    4 standard errors of that noise (a one-sided z-test at p ~ 3e-5)."""
    def run(learn):
        agent = Dreamer(make_config(seed=3), OBS_SPACE, ACT_SPACE)
        if not learn:
            agent.model_opt.learning_rate.assign(0.0)
        batch = make_batch(agent.config, seed=7)
        return [agent.train(batch) for _ in range(60)]

    learner, control = run(True), run(False)
    assert all(h["model_nonfinite"] == 0 for h in learner + control)
    for key in ("image_loss", "reward_loss", "model_loss"):
        noise = np.std([h[key] for h in control])  # per-step fluctuation without learning
        gap = np.mean([h[key] for h in control[-10:]]) - np.mean([h[key] for h in learner[-10:]])
        assert gap > 4 * noise * np.sqrt(2 / 10), (key, gap, noise)


def test_nonfinite_model_update_is_skipped_and_reported(agent):
    batch = make_batch(agent.config, seed=4)
    batch["reward"][0, 3] = np.nan  # poisons only the world-model loss
    before_model, before_actor = snapshot(agent.model_variables), snapshot(agent.actor_variables)
    iterations = int(agent.model_opt.iterations.numpy())
    metrics = agent.train(batch)
    assert metrics["model_nonfinite"] == 1.0 and metrics["actor_nonfinite"] == 0.0
    assert not any(changed(before_model, agent.model_variables))
    assert int(agent.model_opt.iterations.numpy()) == iterations
    assert any(changed(before_actor, agent.actor_variables))  # the other optimisers still step


def test_float16_train_steps_finite_and_report_loss_scale_skips():
    cfg = make_config(precision=16)
    agent = Dreamer(cfg, OBS_SPACE, ACT_SPACE)
    assert agent.encoder.convs[0].compute_dtype == "float16"
    assert agent.encoder.convs[0].kernel.dtype == "float32"
    batch = make_batch(cfg)
    skipped = 0
    for _ in range(12):  # the default initial scale 2^15 overflows the first few steps
        scale = float(agent.model_opt.dynamic_scale.numpy())
        before = snapshot(agent.model_variables)
        metrics = agent.train(batch)
        for key in ("model_loss", "actor_loss", "value_loss"):
            assert np.isfinite(metrics[key])
        moved = any(changed(before, agent.model_variables))
        # Each start-up skip is the loss scaler's search: the divergence guard does not count it.
        assert metrics["model_loss_scale_skip"] == metrics["model_nonfinite"]
        if metrics["model_nonfinite"]:
            skipped += 1
            assert not moved and float(agent.model_opt.dynamic_scale.numpy()) == scale / 2
        else:
            assert moved and np.isfinite(metrics["model_grad_norm"])
    assert 0 < skipped < 12
    # A real divergence is not the search: a NaN weight (a non-finite float32 loss) ...
    kernel = agent.reward.trainable_variables[0]
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    metrics = agent.train(batch)
    assert metrics["model_nonfinite"] == 1.0 and metrics["model_loss_scale_skip"] == 0.0
    # ... and a skip at the smallest loss scale, where the gradients overflow unscaled.
    kernel.assign(np.zeros(kernel.shape, np.float32))
    agent.model_opt.dynamic_scale.assign(1.0)
    batch["reward"][:] = 1e8  # a finite float32 loss whose gradient overflows float16 (max 65504) unscaled
    metrics = agent.train(batch)
    assert metrics["model_nonfinite"] == 1.0 and metrics["model_loss_scale_skip"] == 0.0, metrics


@pytest.mark.slow
def test_xla_train_step_finite():
    cfg = make_config(jit=True, seed=1)
    agent = Dreamer(cfg, OBS_SPACE, ACT_SPACE)
    metrics = agent.train(make_batch(cfg))
    assert all(np.isfinite(metrics[k]) for k in ("model_loss", "actor_loss", "value_loss"))
    action, _ = agent.policy({"image": make_batch(cfg)["image"][:, 0], "reset": np.ones(3, bool)}, None, True)
    assert np.all(np.isfinite(action))


def test_policy_resets_state(agent):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    action, fresh = agent.policy({"image": image, "reset": np.ones(3, bool)}, None, training=True)
    assert action.shape == (3, 2) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
    # A non-zero state, reset in envs 0 and 2: their deterministic state restarts from zeros.
    state = {k: tf.ones_like(v) for k, v in fresh.items()}
    _, new = agent.policy({"image": image, "reset": np.array([True, False, True])}, state, training=False)
    deter, deter_fresh = new["deter"].numpy(), fresh["deter"].numpy()
    np.testing.assert_allclose(deter[[0, 2]], deter_fresh[[0, 2]], rtol=1e-5)
    assert not np.allclose(deter[1], deter_fresh[1])
    with pytest.raises(ValueError, match="uint8"):
        agent.policy({"image": image.astype(np.float32), "reset": np.ones(3, bool)}, None, training=True)
    agent.policy({"image": image[:1], "reset": np.ones(1, bool)}, None, training=True)  # another N
    assert agent._policy_train.experimental_get_tracing_count() == 1


def tanh_normal_mode_by_grid(loc, scale):
    """argmax_y of the density of y = tanh(x), x ~ N(loc, scale^2), per element, by a grid search in
    x = atanh(y) (float64): ln p(y) = ln N(x; loc, scale) + 2 ln cosh(x) + const."""
    modes = []
    for m, s in zip(np.ravel(loc).astype(np.float64), np.ravel(scale).astype(np.float64)):
        grid = np.linspace(min(m - 2 * s * s, -1) - 5, max(m + 2 * s * s, 1) + 5, 400001)
        log_density = -0.5 * ((grid - m) / s) ** 2 + 2 * (np.abs(grid) + np.log1p(np.exp(-2 * np.abs(grid))))
        modes.append(np.tanh(grid[np.argmax(log_density)]))
    return np.reshape(modes, np.shape(loc))


@pytest.mark.parametrize("init_std", [5.0, 0.2])
def test_eval_policy_is_mode_without_noise(agent, init_std):
    """The evaluation action is the argmax of the action distribution's density, found here by a
    grid search (not by TanhNormal.mode): at the initial std 5 it sits at the bounds +-1, far from
    tanh(mean); at std 0.2 inside (-1, 1). (Compared at the latent state the policy returns: the
    posterior is sampled, so two calls on the same image act from different states.)"""
    if init_std != agent.config.action_init_std:
        agent = Dreamer(make_config(action_init_std=init_std), OBS_SPACE, ACT_SPACE)
    image = np.random.default_rng(1).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    a1, s1 = agent.policy({"image": image, "reset": np.ones(3, bool)}, None, training=False)
    latent = {k: s1[k] for k in ("mean", "std", "stoch", "deter")}
    dist = agent.actor(agent.rssm.get_feat(latent))
    loc, scale = dist.loc.numpy(), dist.scale.numpy()
    want = tanh_normal_mode_by_grid(loc, scale)
    np.testing.assert_allclose(a1, want, atol=1e-3)
    if init_std == 5.0:
        assert np.all(np.abs(want) > 0.999) and np.all(np.abs(np.tanh(loc)) < 0.9)
    else:
        assert np.all(np.abs(want) < 0.99)


def test_exploration_amount_decays_linearly():
    agent = Dreamer(make_config(expl_decay=10, expl_amount=0.3, expl_min=0.1), OBS_SPACE, ACT_SPACE)
    for step, want in ((0, 0.3), (5, 0.2), (10, 0.1), (50, 0.1)):
        agent.train_step_count.assign(step)
        assert float(agent.expl_amount()) == pytest.approx(want, abs=1e-6)


def test_seeded_construction_is_reproducible():
    a = Dreamer(make_config(seed=5), OBS_SPACE, ACT_SPACE)
    b = Dreamer(make_config(seed=5), OBS_SPACE, ACT_SPACE)
    c = Dreamer(make_config(seed=6), OBS_SPACE, ACT_SPACE)
    for x, y in zip(a.model_variables + a.actor_variables, b.model_variables + b.actor_variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not np.array_equal(a.actor.out.kernel.numpy(), c.actor.out.kernel.numpy())


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_next_step(tmp_path):
    cfg = make_config(seed=11)
    original = Dreamer(cfg, OBS_SPACE, ACT_SPACE)
    for seed in range(2):
        original.train(make_batch(cfg, seed))
    original.policy({"image": np.zeros((1, 64, 64, 3), np.uint8), "reset": np.ones(1, bool)}, None, True)
    path = Checkpointer(tmp_path).save(original, 2, {})
    restored = Dreamer(cfg, OBS_SPACE, ACT_SPACE)
    Checkpointer(tmp_path).restore(restored, path)
    assert int(restored.train_step_count.numpy()) == 2
    assert int(restored.model_opt.iterations.numpy()) == int(original.model_opt.iterations.numpy())
    batch = make_batch(cfg, seed=9)
    want, got = original.train(batch), restored.train(batch)
    assert want == got
    # A fresh agent (same seed, no restore) differs: the comparison above can fail.
    assert Dreamer(cfg, OBS_SPACE, ACT_SPACE).train(batch) != want


def test_video_predictions(agent):
    video = agent.video_predictions(make_batch(agent.config))
    assert video.shape == (3, agent.config.batch_length, 64, 3 * 64, 3) and video.dtype == np.uint8
    np.testing.assert_array_equal(video[:, :, :, :64], make_batch(agent.config)["image"])  # left: real frames


def test_bad_spaces_raise():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Dreamer(make_config(), OBS_SPACE, NS(shape=(2,), low=np.zeros(2), high=np.ones(2)))
    with pytest.raises(ValueError, match="image"):
        Dreamer(make_config(), {"state": NS(shape=(3,), dtype=np.float32)}, ACT_SPACE)


@pytest.mark.slow
def test_unrolled_train_step_matches_the_scan_train_step():
    """Same weights, same batch, same random stream: the unrolled-loop train step computes the same
    losses as the default tf.scan step. (XLA is not compared exactly: tf.random.Generator draws
    different numbers under jit_compile, so its samples differ; test_xla_train_step_finite covers it.)"""
    plain = Dreamer(make_config(), OBS_SPACE, ACT_SPACE)
    other = Dreamer(make_config(), OBS_SPACE, ACT_SPACE, unroll=True)
    for a, b in zip(plain.variables, other.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    batch = make_batch(make_config())
    first, second = plain.train(batch), other.train(batch)
    for key in ("model_loss", "image_loss", "reward_loss", "kl", "actor_loss", "value_loss"):
        assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-4), key
