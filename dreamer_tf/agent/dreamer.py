"""The Dreamer agent: the glue between the modules, their optimisers, one compiled train step and the policy.

`train(batch)` runs ONE tf.function that computes, on the same pre-update weights,
  1. the world-model loss (`world_model.world_model_loss`), minimised by Adam(model_lr) over the
     encoder, RSSM, decoder and heads;
  2. the actor loss on `horizon` imagined steps from every posterior state
     (`behavior.imagine_ahead`, `behavior.actor_loss`): its gradient flows through the transition
     and reward models into the action model, but only the actor optimiser applies it;
  3. the value loss on the same imagined trajectories (`behavior.value_loss`);
then applies the three updates, each skipped inside the graph when non-finite (`optim`). The losses
are wired once, in `step.losses_and_grads`, which the replicated step calls too.
All randomness comes from `self.rng`, a tf.random.Generator seeded by config.seed.

With `strategy` mirrored or multi_worker the variables are mirrored and the step runs data-parallel
on the replicas with the single-device math (`replicas.train_function`); the policy, evaluation and
`self.rng` stay on the chief.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from dreamer_tf.agent import explore, inputs, openloop, optim, replicas, step
from dreamer_tf.agent.world_model import WorldModel, embed
from dreamer_tf.models import (RSSM, STATE_KEYS, ActionHead, ConvDecoder, ConvEncoder, DenseHead, Initializers,
                               StateDecoder, StateEncoder, StateModel, dtype_policy)

__all__ = ["Dreamer", "METRIC_KEYS"]

METRIC_KEYS = (
    "model_loss", "image_loss", "reward_loss", "kl", "prior_ent", "post_ent", "actor_loss", "value_loss",
    "actor_entropy", "model_grad_norm", "actor_grad_norm", "value_grad_norm", "imag_return",
    "model_nonfinite", "actor_nonfinite", "value_nonfinite")


class Dreamer(tf.Module):
    """Dreamer v1 agent.

    Modules: encoder and decoder for images, state_encoder and state_decoder for the state vector
    (each None when that observation is not used, decoders also without reconstruction), rssm,
    state_model ('contrastive', else None), reward, pcont (config.pcont, else None), value, actor.
    The observation space must hold the keys `config.observation` asks for.
    Optimisers: model_opt, actor_opt, value_opt. `unroll` (default: config.unroll) unrolls the
    observe and imagine loops in the graph instead of tf.scan: the same math, faster for small models.
    """

    def __init__(self, config: Mapping[str, Any], obs_space: Mapping[str, Any], act_space: Any,
                 unroll: bool | None = None):
        super().__init__(name="dreamer")
        self.config = c = config
        # The observations the agent encodes: image, state, or both (config.observation).
        self.obs_shapes = inputs.check_spaces(obs_space, act_space, inputs.observation_keys(c.observation))
        self.discrete, self.expl = explore.action_kind(c, act_space)
        self.action_size = int(act_space.n) if self.discrete else int(act_space.shape[0])
        self.precision = c.precision  # 32, 16 (float16 with loss scaling) or "bf16" (no loss scaling)
        policy = dtype_policy(self.precision)
        init = Initializers(c.seed)
        # One generator for all sampling; a counter for the exploration schedule and checkpoints.
        # The generator is made outside the strategy's scope: one stream, drawn in cross-replica context.
        self.strategy = replicas.make_strategy(c) if c.get("strategy", "one") != "one" else None
        self.rng = tf.random.Generator.from_seed(int(c.seed))
        with self.strategy.scope() if self.strategy is not None else contextlib.nullcontext():
            self._create(c, act_space, policy, init, unroll)

    def _create(self, c: Mapping[str, Any], act_space: Any, policy: Any, init: Initializers,
                unroll: bool | None) -> None:
        """Variables, modules, optimisers and compiled functions (in the strategy's scope)."""
        self.train_step_count = tf.Variable(0, dtype=tf.int64, trainable=False, name="train_step_count")

        # Creation order fixes each layer's initialiser seed: keep it.
        image, state, reconstruct = "image" in self.obs_shapes, "state" in self.obs_shapes, \
            c.representation == "reconstruction"
        self.encoder = ConvEncoder(c.cnn_depth, c.cnn_act, init, dtype=policy) if image else None
        self.state_encoder = (StateEncoder(c.state_layers, c.num_units, c.dense_act, init, dtype=policy)
                              if state else None)
        self.rssm = RSSM(c.stoch_size, c.deter_size, c.deter_size, c.dense_act, init=init, rng=self.rng,
                         unroll=bool(c.unroll) if unroll is None else unroll, dtype=policy)
        self.decoder = ConvDecoder(c.cnn_depth, c.cnn_act, init, dtype=policy) if image and reconstruct else None
        self.state_decoder = (StateDecoder(self.obs_shapes["state"][0], c.state_layers, c.num_units, c.dense_act,
                                           init, dtype=policy) if state and reconstruct else None)
        self.state_model = (StateModel(c.stoch_size, 2, c.num_units, c.dense_act, init, dtype=policy)
                            if c.representation == "contrastive" else None)
        self.reward = DenseHead((), 2, c.num_units, c.dense_act, init, dtype=policy, name="reward")
        self.pcont = (DenseHead((), 3, c.num_units, c.dense_act, init, dist="binary", dtype=policy, name="pcont")
                      if c.pcont else None)
        self.value = DenseHead((), 3, c.num_units, c.dense_act, init, dtype=policy, name="value")
        self.actor = ActionHead(self.action_size, 4, c.num_units, c.dense_act, init,
                                dist="onehot" if self.discrete else "tanh_normal",
                                init_std=c.action_init_std, dtype=policy, name="actor")
        self.world_model = WorldModel(encoder=self.encoder, rssm=self.rssm, reward=self.reward,
                                      decoder=self.decoder, state_model=self.state_model, pcont=self.pcont,
                                      state_encoder=self.state_encoder, state_decoder=self.state_decoder)
        self._build_modules()

        self.model_modules = [m for m in (self.encoder, self.rssm, self.decoder, self.state_model, self.reward,
                                          self.pcont, self.state_encoder, self.state_decoder) if m is not None]
        make = lambda lr, variables, name: optim.make_optimizer(  # noqa: E731
            lr, variables, name, eps=c.adam_eps, clip=c.grad_clip, weight_decay=c.weight_decay,
            precision=self.precision)
        self.model_opt = make(c.model_lr, self.model_variables, "model_opt")
        self.actor_opt = make(c.actor_lr, self.actor_variables, "actor_opt")
        self.value_opt = make(c.value_lr, self.value_variables, "value_opt")

        self.batch_spec = inputs.batch_spec(c, self.action_size, self.obs_shapes)
        if self.strategy is None:
            self._train_fn = tf.function(self._train, input_signature=[self.batch_spec], jit_compile=bool(c.jit))
        else:
            self._train_fn = replicas.train_function(self, self.strategy)
        specs = [inputs.policy_obs_spec(self.obs_shapes), inputs.policy_state_spec(c, self.action_size),
                 tf.TensorSpec([], tf.float32)]
        self._policy_train = tf.function(lambda obs, state, amount: self._policy(obs, state, True, amount),
                                         input_signature=specs, jit_compile=bool(c.jit))
        self._policy_eval = tf.function(lambda obs, state, amount: self._policy(obs, state, False, amount),
                                        input_signature=specs, jit_compile=bool(c.jit))
        self.compiled_openloop = tf.function(lambda obs, action: openloop.openloop_frames(
            self.world_model, obs, action))

    def _build_modules(self) -> None:
        """Create every variable now (eagerly) so optimisers and checkpoints see them all."""
        action = tf.zeros([1, 1, self.action_size])
        dtypes = {"image": tf.uint8, "state": tf.float32}
        embedding = embed(self.world_model, {k: tf.zeros([1, 1, *shape], dtypes[k])
                                             for k, shape in self.obs_shapes.items()})
        zeros = tf.zeros([1, 1, self.config.stoch_size])
        post, _ = self.rssm.observe(embedding, action, noise=zeros, prior_noise=zeros)
        feat = self.rssm.get_feat(post)
        for head in (self.decoder, self.state_decoder, self.reward, self.pcont, self.value, self.actor):
            if head is not None:
                head(feat)
        if self.state_model is not None:
            self.state_model(embedding)

    @property
    def model_variables(self) -> list:
        return [v for m in self.model_modules for v in m.trainable_variables]

    @property
    def actor_variables(self) -> list:
        return list(self.actor.trainable_variables)

    @property
    def value_variables(self) -> list:
        return list(self.value.trainable_variables)

    # --- learning ------------------------------------------------------------------------
    def _train(self, data: dict) -> dict:
        """The single-device step: the step's math (`step`) on the whole batch, then the three updates."""
        losses, grads, metrics, post = step.losses_and_grads(self, data, step.draw_noise(self))
        # All losses above read the pre-update weights; apply the three updates now.
        for name, opt, variables in self.optimizers():
            metrics.update(step.update_metrics(name, opt, losses[name], self.precision, lambda: optim.apply_gradients(
                opt, losses[name], grads[name], variables, self.precision)))
        metrics.update(step.after_update(self, post))
        self.train_step_count.assign_add(1)
        return {k: tf.cast(v, tf.float32) for k, v in metrics.items()}

    def optimizers(self) -> list[tuple[str, Any, list]]:
        """(name, optimiser, variables) of the three updates, in `step.GROUPS` order."""
        return [("model", self.model_opt, self.model_variables), ("actor", self.actor_opt, self.actor_variables),
                ("value", self.value_opt, self.value_variables)]

    def train(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One gradient step on each model; batch: image uint8 [B, L, 64, 64, 3], action [B, L, A],
        reward [B, L] (+ discount [B, L] with pcont). Returns python-float metrics."""
        data = inputs.convert_batch(batch, self.batch_spec)
        if self.strategy is not None:  # each replica gets its rows of the global batch
            data = replicas.distribute_batch(self.strategy, data)
        metrics = self._train_fn(data)
        return {k: float(v) for k, v in metrics.items()}

    # --- acting --------------------------------------------------------------------------
    def expl_amount(self, env_step: int = 0) -> float:
        """The exploration amount now: by gradient steps (linear schedule) or `env_step` (halving)."""
        c = self.config
        step = env_step if c.expl_schedule == "halving" else self.train_step_count
        return float(explore.expl_amount(step, c.expl_amount, c.expl_decay, c.expl_min, c.expl_schedule))

    def _policy(self, obs: dict, state: dict, training: bool, amount: tf.Tensor) -> tuple[tf.Tensor, dict]:
        c = self.config
        keep = 1.0 - tf.cast(obs["reset"], tf.float32)[:, None]  # zero latent and action on reset
        state = {k: v * keep for k, v in state.items()}
        embedding = embed(self.world_model, obs)
        latent, _ = self.rssm.obs_step({k: state[k] for k in STATE_KEYS}, state["action"], embedding)
        dist = self.actor(self.rssm.get_feat(latent))
        if training:
            action = dist.sample(seed=tf.cast(self.rng.make_seeds(1)[:, 0], tf.int32))
            action = explore.explore(action, self.expl, amount, self.rng, self.action_size)
        else:
            action = dist.mode()
            if c.eval_noise > 0:
                kind = "epsilon_greedy" if self.discrete else "additive_gaussian"
                action = explore.explore(action, kind, tf.constant(c.eval_noise, tf.float32), self.rng,
                                         self.action_size)
        action = tf.stop_gradient(tf.cast(action, tf.float32))
        return action, {**latent, "action": action}

    def initial_state(self, num_envs: int) -> dict:
        """The zero policy state for `num_envs` environments."""
        return {**self.rssm.initial(num_envs), "action": tf.zeros([num_envs, self.action_size])}

    def policy(self, obs: Mapping[str, Any], state: dict | None, training: bool,
               env_step: int = 0) -> tuple[np.ndarray, dict]:
        """Act in N environments: obs image uint8 [N, 64, 64, 3] and/or state float32 [N, D] (the
        agent's observations; other keys are ignored), reset bool [N] (True at an episode's first
        observation); env_step: env steps so far (for the `halving` exploration schedule).
        Returns (action float32 [N, A] numpy, state for the next call)."""
        obs = inputs.check_policy_obs(obs, self.obs_shapes)
        n = obs["reset"].shape[0]
        if state is None:
            state = self.initial_state(n)
        elif int(state["deter"].shape[0]) != n:
            raise ValueError(f"policy state is for {state['deter'].shape[0]} environments, obs for {n}")
        fn = self._policy_train if training else self._policy_eval
        amount = self.expl_amount(env_step) if training else 0.0
        action, state = fn(obs, dict(state), tf.constant(amount, tf.float32))
        return action.numpy(), state

    def video_predictions(self, batch: Mapping[str, Any], max_sequences: int = 6) -> np.ndarray:
        """See `openloop.video_predictions`."""
        return openloop.video_predictions(self, batch, max_sequences)
