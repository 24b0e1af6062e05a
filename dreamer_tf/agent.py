"""The Dreamer agent: world model, action and value models, one compiled train step, the policy.

Paper: Hafner et al. 2020, "Dream to Control", Sec. 3-4 and Appendix; reference: danijar/dreamer.

train(batch) runs ONE tf.function that
  1. world model:  J = E[ln q(o|s) + ln q(r|s)] - beta * max(KL(p(s|..o) || q(s|..)), free_nats)
     (KL summed over the stochastic dims, averaged over batch and time, then clipped, as the
     reference), maximised with Adam(model_lr);
  2. behaviour: imagines `horizon` steps from all B*T posterior states (stop-gradient starts),
     actor loss = -mean(w_t * V_lambda(t)) with w_t = prod_{k<t} gamma_k (stop-gradient) --
     gradients flow through the transition and reward models into the action model, but only the
     actor optimiser applies them, to the actor variables;
     value loss = -mean(w_t * ln q_v(V_lambda(t) | s_t)) with stop-gradient targets and features;
  3. applies the three updates (all losses use the pre-update weights, as the reference), each
     skipped inside the graph when its loss or gradient norm is non-finite.
All randomness comes from `self.rng` (a tf.random.Generator seeded by config.seed).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from dreamer_tf.losses import contrastive_term
from dreamer_tf.networks import (IMAGE_SHAPE, ActionHead, ConvDecoder, ConvEncoder, DenseHead, Initializers,
                                 StateModel, dtype_policy, preprocess_image)
from dreamer_tf.returns import lambda_return
from dreamer_tf.rssm import RSSM, STATE_KEYS, scan

tfd = tfp.distributions

__all__ = ["Dreamer", "METRIC_KEYS"]

METRIC_KEYS = (
    "model_loss", "image_loss", "reward_loss", "kl", "prior_ent", "post_ent", "actor_loss", "value_loss",
    "actor_entropy", "model_grad_norm", "actor_grad_norm", "value_grad_norm", "imag_return",
    "model_nonfinite", "actor_nonfinite", "value_nonfinite", "expl_amount")


def _flatten_bt(x: tf.Tensor) -> tf.Tensor:
    """[B, T, ...] -> [B*T, ...]."""
    return tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))


class Dreamer(tf.Module):
    """Dreamer v1 agent.

    Sub-modules: encoder, rssm, decoder (representation 'reconstruction', else None), state_model
    (representation 'contrastive', else None), reward, pcont (config.pcont, else None), value, actor.
    Optimisers: model_opt, actor_opt, value_opt (keras Adam; LossScaleOptimizer with precision 16).
    """

    def __init__(self, config: Mapping[str, Any], obs_space: Mapping[str, Any], act_space: Any,
                 unroll: bool = False):
        """unroll: unroll the observe/imagine loops in the graph instead of tf.scan. Measured on this
        2-core CPU (paper sizes, B=L=50): tf.scan 7-12 s/step vs. unrolled 11-15 s/step, and tf.scan
        traces in half the time, so it is the default."""
        super().__init__(name="dreamer")
        self.config = config
        c = config
        self._check_spaces(obs_space, act_space)
        self.discrete, self.expl = self._action_kind(c, act_space)
        self.action_size = int(act_space.n) if self.discrete else int(act_space.shape[0])
        self.precision = int(c.precision)
        policy = dtype_policy(self.precision)
        init = Initializers(c.seed)

        # One generator for all sampling; a counter for exploration decay and checkpoints.
        self.rng = tf.random.Generator.from_seed(int(c.seed))
        self.train_step_count = tf.Variable(0, dtype=tf.int64, trainable=False, name="train_step_count")

        self.encoder = ConvEncoder(c.cnn_depth, c.cnn_act, init, dtype=policy)
        self.rssm = RSSM(c.stoch_size, c.deter_size, c.deter_size, c.dense_act, init=init, rng=self.rng,
                         unroll=unroll, dtype=policy)
        self.decoder = (ConvDecoder(c.cnn_depth, c.cnn_act, init, dtype=policy)
                        if c.representation == "reconstruction" else None)
        self.state_model = (StateModel(c.stoch_size, 2, c.num_units, c.dense_act, init, dtype=policy)
                            if c.representation == "contrastive" else None)
        self.reward = DenseHead((), 2, c.num_units, c.dense_act, init, dtype=policy, name="reward")
        self.pcont = (DenseHead((), 3, c.num_units, c.dense_act, init, dist="binary", dtype=policy, name="pcont")
                      if c.pcont else None)
        self.value = DenseHead((), 3, c.num_units, c.dense_act, init, dtype=policy, name="value")
        self.actor = ActionHead(self.action_size, 4, c.num_units, c.dense_act, init,
                                dist="onehot" if self.discrete else "tanh_normal",
                                init_std=c.action_init_std, dtype=policy, name="actor")
        self._build_modules()

        self.model_modules = [m for m in (self.encoder, self.rssm, self.decoder, self.state_model, self.reward,
                                          self.pcont)
                              if m is not None]
        self.model_opt = self._make_optimizer(c.model_lr, self.model_variables, "model_opt")
        self.actor_opt = self._make_optimizer(c.actor_lr, self.actor_variables, "actor_opt")
        self.value_opt = self._make_optimizer(c.value_lr, self.value_variables, "value_opt")

        self._train_fn = tf.function(self._train, input_signature=[self._batch_spec()],
                                     jit_compile=bool(c.jit))
        state_spec = self._policy_state_spec()
        obs_spec = dict(image=tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8), reset=tf.TensorSpec([None], tf.bool))
        self._policy_train = tf.function(lambda obs, state: self._policy(obs, state, True),
                                         input_signature=[obs_spec, state_spec], jit_compile=bool(c.jit))
        self._policy_eval = tf.function(lambda obs, state: self._policy(obs, state, False),
                                        input_signature=[obs_spec, state_spec], jit_compile=bool(c.jit))
        self._video_fn = tf.function(self._video_predictions)

    # --- construction helpers ----------------------------------------------------------
    @staticmethod
    def _check_spaces(obs_space: Mapping[str, Any], act_space: Any) -> None:
        if "image" not in obs_space:
            raise ValueError(f"obs_space must contain 'image', got keys {sorted(obs_space)}")
        shape = tuple(obs_space["image"].shape)
        if shape != IMAGE_SHAPE:
            raise ValueError(f"obs_space['image'].shape must be {IMAGE_SHAPE}, got {shape}")
        if getattr(act_space, "n", None) is None:
            shape = tuple(act_space.shape)
            if len(shape) != 1 or shape[0] < 1:
                raise ValueError(f"continuous act_space.shape must be (A,), got {shape}")
            low, high = np.asarray(act_space.low), np.asarray(act_space.high)
            if not (np.allclose(low, -1) and np.allclose(high, 1)):
                raise ValueError(f"continuous actions must be normalised to [-1, 1] (tanh action model), "
                                 f"got low={low.tolist()} high={high.tolist()}")

    @staticmethod
    def _action_kind(c: Mapping[str, Any], act_space: Any) -> tuple[bool, str]:
        """(discrete?, exploration kind), checked against the action space. `expl: auto` means
        Gaussian noise for continuous actions (DMC) and epsilon-greedy for discrete ones (Atari)."""
        has_n = getattr(act_space, "n", None) is not None
        if c.action_dist == "auto":
            discrete = has_n
        else:
            discrete = c.action_dist == "onehot"
            if discrete != has_n:
                raise ValueError(f"action_dist {c.action_dist!r} does not fit the action space "
                                 f"({'discrete' if has_n else 'continuous'} {act_space})")
        expl = c.expl if c.expl != "auto" else ("epsilon_greedy" if discrete else "additive_gaussian")
        if discrete and expl == "additive_gaussian":
            raise ValueError("expl 'additive_gaussian' is for continuous actions; use expl=epsilon_greedy "
                             "(or none) with discrete actions")
        if not discrete and expl == "epsilon_greedy":
            raise ValueError("expl 'epsilon_greedy' is for discrete actions; use expl=additive_gaussian "
                             "(or none) with continuous actions")
        return discrete, expl

    def _build_modules(self) -> None:
        """Create every variable now (eagerly) so optimisers and checkpoints see them all."""
        image = tf.zeros([1, 1, *IMAGE_SHAPE], tf.uint8)
        action = tf.zeros([1, 1, self.action_size])
        embed = self.encoder(image)
        post, _ = self.rssm.observe(embed, action, noise=tf.zeros([1, 1, self.config.stoch_size]),
                                    prior_noise=tf.zeros([1, 1, self.config.stoch_size]))
        feat = self.rssm.get_feat(post)
        for head in (self.decoder, self.reward, self.pcont, self.value, self.actor):
            if head is not None:
                head(feat)
        if self.state_model is not None:
            self.state_model(embed)

    def _make_optimizer(self, lr: float, variables: list, name: str) -> keras.optimizers.Optimizer:
        c = self.config
        opt = keras.optimizers.Adam(
            learning_rate=lr, epsilon=c.adam_eps, weight_decay=c.weight_decay or None,
            global_clipnorm=c.grad_clip or None, name=name)
        if self.precision == 16:
            opt = keras.optimizers.LossScaleOptimizer(opt, name=name + "_loss_scale")
        opt.build(variables)
        return opt

    @property
    def model_variables(self) -> list:
        return [v for m in self.model_modules for v in m.trainable_variables]

    @property
    def actor_variables(self) -> list:
        return list(self.actor.trainable_variables)

    @property
    def value_variables(self) -> list:
        return list(self.value.trainable_variables)

    def _batch_spec(self) -> dict:
        c = self.config
        b, l = c.batch_size, c.batch_length
        spec = dict(image=tf.TensorSpec([b, l, *IMAGE_SHAPE], tf.uint8),
                    action=tf.TensorSpec([b, l, self.action_size], tf.float32),
                    reward=tf.TensorSpec([b, l], tf.float32))
        if c.pcont:
            spec["discount"] = tf.TensorSpec([b, l], tf.float32)
        return spec

    def _policy_state_spec(self) -> dict:
        c = self.config
        spec = {k: tf.TensorSpec([None, c.stoch_size], tf.float32) for k in ("mean", "std", "stoch")}
        spec["deter"] = tf.TensorSpec([None, c.deter_size], tf.float32)
        spec["action"] = tf.TensorSpec([None, self.action_size], tf.float32)
        return spec

    # --- input checking ------------------------------------------------------------------
    def _convert_batch(self, batch: Mapping[str, Any]) -> dict:
        """Check keys, shapes and dtypes in Python (clear errors) and convert to tensors."""
        out = {}
        for key, spec in self._batch_spec().items():
            if key not in batch:
                raise ValueError(f"training batch is missing key {key!r} (has {sorted(batch)})")
            value = batch[key]
            shape = tuple(value.shape)
            if shape != tuple(spec.shape):
                raise ValueError(f"training batch[{key!r}] has shape {shape}, expected {tuple(spec.shape)} "
                                 f"(batch_size, batch_length{', ...' if len(spec.shape) > 2 else ''})")
            dtype = tf.as_dtype(value.dtype)
            if key == "image" and dtype != tf.uint8:
                raise ValueError(f"training batch['image'] must be uint8 pixels, got dtype {dtype.name}")
            if key != "image" and not dtype.is_floating:
                raise ValueError(f"training batch[{key!r}] must be floating point, got dtype {dtype.name}")
            out[key] = tf.cast(value, spec.dtype) if dtype != spec.dtype else tf.convert_to_tensor(value)
        return out

    # --- losses --------------------------------------------------------------------------
    def world_model_loss(self, data: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, dict, dict]:
        """(model loss, posterior states [B, T, ...], metrics) for a batch of sequences."""
        c = self.config
        embed = self.encoder(data["image"])
        post, prior = self.rssm.observe(embed, data["action"])
        feat = self.rssm.get_feat(post)
        reward = data["reward"]
        if c.clip_rewards == "tanh":
            reward = tf.tanh(reward)
        likes = {}
        if self.decoder is not None:
            target = preprocess_image(data["image"])
            likes["image"] = tf.reduce_mean(self.decoder(feat).log_prob(target))
        if self.state_model is not None:
            # ln q(s_t|o_t) - ln sum_o' q(s_t|o') over all B*T observations, replacing ln q(o_t|s_t).
            mean, std = self.state_model(embed)
            likes["contrastive"] = tf.reduce_mean(contrastive_term(
                _flatten_bt(post["stoch"]), _flatten_bt(mean), _flatten_bt(std)))
        likes["reward"] = tf.reduce_mean(self.reward(feat).log_prob(reward))
        if self.pcont is not None:
            target = data["discount"] * c.discount  # soft labels: 0 at terminals, gamma elsewhere
            likes["pcont"] = c.pcont_scale * tf.reduce_mean(self.pcont(feat).log_prob(target))
        prior_dist, post_dist = self.rssm.get_dist(prior), self.rssm.get_dist(post)
        kl = tf.reduce_mean(tfd.kl_divergence(post_dist, prior_dist))
        kl_clipped = tf.maximum(kl, c.free_nats)  # free nats after averaging (reference)
        loss = c.kl_scale * kl_clipped - tf.add_n(list(likes.values()))
        metrics = dict(kl=kl, prior_ent=tf.reduce_mean(prior_dist.entropy()),
                       post_ent=tf.reduce_mean(post_dist.entropy()),
                       image_loss=-likes.get("image", tf.constant(0.0)), reward_loss=-likes["reward"])
        if "pcont" in likes:
            metrics["pcont_loss"] = -likes["pcont"]
        if "contrastive" in likes:
            metrics["contrastive_loss"] = -likes["contrastive"]
        return loss, post, metrics

    def imagine_ahead(self, post: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """Imagine `horizon` steps with the action model from every posterior state.

        post: states [B, T, ...]; returns features [H, B*T, F] of the imagined states s_1..s_H
        (not the start) and the per-step actor entropy estimate -ln pi(a|s) [H, B*T].
        The start states and the actor's input features are stop-gradient'ed (reference), so the
        actor gradient reaches the action model only through the sampled actions and dynamics.
        """
        c = self.config
        if self.pcont is not None:
            post = {k: v[:, :-1] for k, v in post.items()}  # the last state may be terminal (reference)
        start = {k: tf.stop_gradient(_flatten_bt(post[k])) for k in STATE_KEYS}
        num = tf.shape(start["deter"])[0]
        noise = self.rng.normal(tf.stack([c.horizon, num, c.stoch_size]))
        seeds = tf.cast(tf.transpose(self.rng.make_seeds(c.horizon)), tf.int32)  # [H, 2] actor seeds

        def step(prev, inputs):
            noise_t, seed_t = inputs
            dist = self.actor(tf.stop_gradient(self.rssm.get_feat(prev)))
            action, log_prob = dist.experimental_sample_and_log_prob(seed=seed_t)
            state = self.rssm.img_step(prev, action, noise_t)
            return state, (state, -tf.stop_gradient(log_prob))

        states, neg_log_prob = scan(step, (noise, seeds), start, unroll=self.rssm.unroll)
        return self.rssm.get_feat(states), neg_log_prob

    def actor_loss(self, imag_feat: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(actor loss, lambda-returns [H-1, N], weights [H-1, N]) from imagined features [H, N, F]."""
        c = self.config
        reward = self.reward(imag_feat).mean()  # already in tanh-clipped units if clip_rewards=tanh
        if self.pcont is not None:
            pcont = self.pcont(imag_feat).mean()
        else:
            pcont = c.discount * tf.ones_like(reward)
        value = self.value(imag_feat).mean()
        returns = lambda_return(reward[:-1], value[:-1], pcont[:-1], bootstrap=value[-1], lambda_=c.disclam)
        weights = tf.stop_gradient(tf.math.cumprod(tf.concat([tf.ones_like(pcont[:1]), pcont[:-2]], 0), 0))
        loss = -tf.reduce_mean(weights * returns)
        return loss, returns, weights

    def value_loss(self, imag_feat: tf.Tensor, returns: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """-mean(w_t ln q_v(V_lambda | s_t)) on stop-gradient features and targets."""
        value_pred = self.value(tf.stop_gradient(imag_feat)[:-1])
        return -tf.reduce_mean(weights * value_pred.log_prob(tf.stop_gradient(returns)))

    # --- optimisation --------------------------------------------------------------------
    def _scale(self, loss: tf.Tensor, opt) -> tf.Tensor:
        """The loss to differentiate: loss-scaled with precision 16 (call inside the tape)."""
        return opt.scale_loss(loss) if self.precision == 16 else loss

    @staticmethod
    def _gradients(tape: tf.GradientTape, target: tf.Tensor, variables: list) -> list:
        grads = tape.gradient(target, variables)
        missing = [v.path for g, v in zip(grads, variables) if g is None]
        if missing:  # a variable the loss does not reach would silently never train
            raise RuntimeError(f"the loss does not depend on variables {missing}")
        return grads

    def _apply(self, opt, loss: tf.Tensor, grads: list, variables: list) -> tuple[tf.Tensor, tf.Tensor]:
        """Apply unless non-finite; returns (unscaled pre-clip gradient norm, nonfinite flag 0/1)."""
        norm = tf.linalg.global_norm(grads)
        finite = tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(norm))
        if self.precision == 16:
            # The LossScaleOptimizer skips non-finite steps itself and lowers its scale; a non-finite
            # loss with finite gradients is routed into the same path by poisoning the gradients.
            norm = norm / tf.cast(opt.dynamic_scale, tf.float32)
            poison = tf.where(tf.math.is_finite(loss), 1.0, np.nan)
            opt.apply([g * tf.cast(poison, g.dtype) for g in grads], variables)
        else:
            def update():
                opt.apply(grads, variables)
                return tf.constant(True)
            tf.cond(finite, update, lambda: tf.constant(False))
        return norm, 1.0 - tf.cast(finite, tf.float32)

    def _train(self, data: dict) -> dict:
        with tf.GradientTape() as model_tape:
            model_loss, post, metrics = self.world_model_loss(data)
            scaled = self._scale(model_loss, self.model_opt)
        model_grads = self._gradients(model_tape, scaled, self.model_variables)

        with tf.GradientTape() as actor_tape:
            imag_feat, neg_log_prob = self.imagine_ahead(post)
            actor_loss, returns, weights = self.actor_loss(imag_feat)
            scaled = self._scale(actor_loss, self.actor_opt)
        actor_grads = self._gradients(actor_tape, scaled, self.actor_variables)

        with tf.GradientTape() as value_tape:
            value_loss = self.value_loss(imag_feat, returns, weights)
            scaled = self._scale(value_loss, self.value_opt)
        value_grads = self._gradients(value_tape, scaled, self.value_variables)

        # All losses above read the pre-update weights; apply the three updates now.
        metrics["model_grad_norm"], metrics["model_nonfinite"] = self._apply(
            self.model_opt, model_loss, model_grads, self.model_variables)
        metrics["actor_grad_norm"], metrics["actor_nonfinite"] = self._apply(
            self.actor_opt, actor_loss, actor_grads, self.actor_variables)
        metrics["value_grad_norm"], metrics["value_nonfinite"] = self._apply(
            self.value_opt, value_loss, value_grads, self.value_variables)
        metrics.update(model_loss=model_loss, actor_loss=actor_loss, value_loss=value_loss,
                       actor_entropy=tf.reduce_mean(neg_log_prob), imag_return=tf.reduce_mean(returns),
                       expl_amount=self._expl_amount())
        self.train_step_count.assign_add(1)
        return {k: tf.cast(v, tf.float32) for k, v in metrics.items()}

    def train(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One gradient step on each model; batch: image uint8 [B, L, 64, 64, 3], action [B, L, A],
        reward [B, L] (+ discount [B, L] with pcont). Returns python-float metrics."""
        metrics = self._train_fn(self._convert_batch(batch))
        return {k: float(v) for k, v in metrics.items()}

    # --- acting --------------------------------------------------------------------------
    def _expl_amount(self) -> tf.Tensor:
        c = self.config
        if not c.expl_decay:
            return tf.constant(c.expl_amount, tf.float32)
        frac = tf.minimum(tf.cast(self.train_step_count, tf.float32) / float(c.expl_decay), 1.0)
        return c.expl_amount + frac * (c.expl_min - c.expl_amount)

    def _explore(self, action: tf.Tensor, kind: str, amount: tf.Tensor) -> tf.Tensor:
        if kind == "additive_gaussian":
            noise = self.rng.normal(tf.shape(action)) * amount
            return tf.clip_by_value(action + noise, -1.0, 1.0)
        if kind == "epsilon_greedy":
            n = tf.shape(action)[0]
            random = tf.one_hot(self.rng.uniform([n], 0, self.action_size, dtype=tf.int32), self.action_size)
            explore = self.rng.uniform([n]) < amount
            return tf.where(explore[:, None], random, action)
        return action

    def _policy(self, obs: dict, state: dict, training: bool) -> tuple[tf.Tensor, dict]:
        c = self.config
        keep = 1.0 - tf.cast(obs["reset"], tf.float32)[:, None]  # zero latent and action on reset
        state = {k: v * keep for k, v in state.items()}
        embed = self.encoder(obs["image"])
        latent, _ = self.rssm.obs_step({k: state[k] for k in STATE_KEYS}, state["action"], embed)
        dist = self.actor(self.rssm.get_feat(latent))
        if training:
            action = dist.sample(seed=tf.cast(self.rng.make_seeds(1)[:, 0], tf.int32))
            action = self._explore(action, self.expl, self._expl_amount())
        else:
            action = dist.mode()
            if c.eval_noise > 0:
                kind = "epsilon_greedy" if self.discrete else "additive_gaussian"
                action = self._explore(action, kind, tf.constant(c.eval_noise, tf.float32))
        action = tf.stop_gradient(tf.cast(action, tf.float32))
        return action, {**latent, "action": action}

    def initial_state(self, num_envs: int) -> dict:
        """The zero policy state for `num_envs` environments."""
        latent = self.rssm.initial(num_envs)
        return {**latent, "action": tf.zeros([num_envs, self.action_size])}

    def policy(self, obs: Mapping[str, Any], state: dict | None, training: bool) -> tuple[np.ndarray, dict]:
        """Act in N environments: obs image uint8 [N, 64, 64, 3], reset bool [N] (True at an episode's
        first observation). Returns (action float32 [N, A] numpy, state for the next call)."""
        image = np.asarray(obs["image"])
        if image.dtype != np.uint8 or image.ndim != 4 or tuple(image.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"policy obs['image'] must be uint8 [N, 64, 64, 3], got {image.dtype} {image.shape}")
        n = image.shape[0]
        reset = np.asarray(obs.get("reset", np.zeros(n, bool)), dtype=bool)
        if reset.shape != (n,):
            raise ValueError(f"policy obs['reset'] must be bool [N={n}], got shape {reset.shape}")
        if state is None:
            state = self.initial_state(n)
        elif int(state["deter"].shape[0]) != n:
            raise ValueError(f"policy state is for {state['deter'].shape[0]} environments, obs for {n}")
        fn = self._policy_train if training else self._policy_eval
        action, state = fn(dict(image=image, reset=reset), dict(state))
        return action.numpy(), state

    # --- evaluation videos ---------------------------------------------------------------
    def _video_predictions(self, image: tf.Tensor, action: tf.Tensor) -> tf.Tensor:
        context = 5
        embed = self.encoder(image)
        post, _ = self.rssm.observe(embed[:, :context], action[:, :context])
        recon = self.decoder.mean(self.rssm.get_feat(post))
        init = {k: v[:, -1] for k, v in post.items()}
        prior = self.rssm.imagine(action[:, context:], init)
        openl = self.decoder.mean(self.rssm.get_feat(prior))
        model = tf.clip_by_value(tf.concat([recon, openl], 1) + 0.5, 0.0, 1.0)
        truth = tf.cast(image, tf.float32) / 255.0
        error = (model - truth + 1.0) / 2.0
        frames = tf.concat([truth, model, error], 3)  # side by side: real | model | error
        return tf.cast(tf.round(frames * 255.0), tf.uint8)

    def video_predictions(self, batch: Mapping[str, Any], max_sequences: int = 6) -> np.ndarray:
        """uint8 [B', T, 64, 3*64, 3]: real frames | reconstructions for the first 5 steps then
        open-loop predictions with the real actions | error ((model - real + 1) / 2), B' <= 6."""
        if self.decoder is None:
            raise ValueError(f"video_predictions needs the decoder (representation 'reconstruction'), "
                             f"this agent uses {self.config.representation!r}")
        image = np.asarray(batch["image"])[:max_sequences]
        action = np.asarray(batch["action"], np.float32)[:max_sequences]
        if image.dtype != np.uint8 or image.ndim != 5 or image.shape[1] <= 5:
            raise ValueError(f"video_predictions needs uint8 images [B, T > 5, 64, 64, 3], got "
                             f"{image.dtype} {image.shape}")
        return self._video_fn(tf.constant(image), tf.constant(action)).numpy()

    # --- checkpoints ---------------------------------------------------------------------
    def _checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(agent=self)

    def save(self, path: str | os.PathLike) -> str:
        """Write every variable (weights, optimiser slots, rng, step counter) to `path` (a prefix)."""
        return self._checkpoint().write(os.fspath(path))

    def load(self, path: str | os.PathLike) -> None:
        """Restore a `save`d checkpoint into this (identically configured) agent; strict."""
        status = self._checkpoint().read(os.fspath(path))
        status.assert_existing_objects_matched()
