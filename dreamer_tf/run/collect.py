"""The actor role: step a batch of environments with a policy and assemble finished episodes.

Episode format: entry t holds the observation o_t, the action a_{t-1} that led to it, the reward
r_t received with it and the discount (0 after a true terminal); entry 0 has a zero action and
reward. So an episode of T agent steps has T+1 entries.

Every episode the loop collects starts from a reset seed of its own, `episode_seed(run seed, role,
worker, episode index)`, the index counted per role (prefill, train, eval) and worker
(`EpisodeSeeds`, kept in the checkpoint): no start state depends on when the process started.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["Collector", "EpisodeSeeds", "ROLES", "episode_role", "episode_seed", "random_actions", "evaluate",
           "RandomAgent",
           "make_envs", "check_envs", "env_options", "spaces", "obs_keys"]

ROLES = ("train", "eval", "prefill")  # the order fixes each role's seeds: append, never reorder


def episode_seed(seed: int, role: str, worker: int, episode: int) -> int:
    """The reset seed (uint32) of episode number `episode` of `role` on env `worker` of a run."""
    words = [int(seed), ROLES.index(role), int(worker), int(episode)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def episode_role(step: int, prefill: int) -> str:
    """The role of an episode that starts at env step `step` (its reset seed's role)."""
    return "prefill" if step < prefill else "train"


class EpisodeSeeds:
    """Per (role, worker) counters of finished episodes; the episode in progress has the index
    `counts[role][worker]`, so counters saved at an episode boundary give the same seeds again."""

    def __init__(self, seed: int, workers: dict[str, int], counts: dict[str, list[int]] | None = None):
        self.seed = int(seed)
        self.counts = {role: [0] * n for role, n in workers.items()}
        for role, values in (counts or {}).items():
            if role not in self.counts or len(values) != len(self.counts[role]):
                raise ValueError(f"episode counters {counts} do not fit the run's envs {workers}")
            self.counts[role] = [int(v) for v in values]

    def current(self, role: str, worker: int) -> int:
        """The reset seed of the episode `worker` starts (or has started) in `role`."""
        return episode_seed(self.seed, role, worker, self.counts[role][worker])

    def finished(self, role: str, worker: int) -> None:
        self.counts[role][worker] += 1

    def to_dict(self) -> dict[str, list[int]]:
        return {role: list(values) for role, values in self.counts.items()}


class Collector:
    """Steps a batch of environments with a policy and assembles finished episodes."""

    def __init__(self, envs, act_space, obs_keys: Sequence[str], seeds: EpisodeSeeds | None = None):
        self.envs = envs
        self.seeds = seeds  # None: unseeded resets (each env continues its random stream)
        self.roles: list[str] = ["train"] * len(envs)  # role of each env's episode in progress
        self.act_space = act_space
        self.obs_keys = list(obs_keys)
        self.num = len(envs)
        self.obs: list[dict] | None = None
        self.reset_flags = np.ones(self.num, bool)
        self.buffers: list[list[dict]] = [[] for _ in range(self.num)]
        self.policy_state = None

    def _seed(self, worker: int, role: str) -> int | None:
        self.roles[worker] = role
        return self.seeds.current(role, worker) if self.seeds is not None else None

    def reset(self, role: str = "train") -> None:
        """Start an episode in every env, as episodes of `role` (their reset seeds)."""
        seeds = [self._seed(i, role) for i in range(self.num)]
        self.obs = self.envs.reset(seeds) if self.seeds is not None else self.envs.reset()
        self.reset_flags[:] = True
        zero = np.zeros(self.act_space.shape, np.float32)
        self.buffers = [[self._transition(o, zero, 0.0, 1.0)] for o in self.obs]
        self.policy_state = None

    def _transition(self, obs: dict, action, reward: float, discount: float) -> dict:
        step = {k: obs[k] for k in self.obs_keys}
        step.update(action=np.asarray(action, np.float32), reward=np.float32(reward),
                    discount=np.float32(discount))
        return step

    def batch_obs(self) -> dict:
        obs = {k: np.stack([o[k] for o in self.obs]) for k in self.obs_keys}
        obs["reset"] = self.reset_flags.copy()
        return obs

    def step(self, actions: np.ndarray, role: str = "train") -> list[dict]:
        """One agent step in every env; returns the episodes that finished (envs are reset, their
        new episodes counted as `role`)."""
        obs, rewards, dones, infos = self.envs.step(actions)
        self.reset_flags[:] = False
        finished = []
        for i in range(self.num):
            self.buffers[i].append(self._transition(obs[i], actions[i], rewards[i],
                                                    infos[i].get("discount", 1.0)))
            if dones[i]:
                episode = {k: np.stack([s[k] for s in self.buffers[i]]) for k in self.buffers[i][0]}
                finished.append(episode)
                if self.seeds is not None:
                    self.seeds.finished(self.roles[i], i)
                    obs[i] = self.envs.reset_at(i, self._seed(i, role))
                else:
                    obs[i] = self.envs.reset_at(i)
                self.buffers[i] = [self._transition(obs[i], np.zeros(self.act_space.shape, np.float32), 0.0, 1.0)]
                self.reset_flags[i] = True
        self.obs = obs
        return finished

    @property
    def at_boundary(self) -> bool:
        """True when no env has an episode in progress (a safe point for a checkpoint)."""
        return all(len(b) == 1 for b in self.buffers)


def random_actions(act_space, num: int, rng: np.random.Generator) -> np.ndarray:
    if hasattr(act_space, "n"):
        return np.eye(act_space.n, dtype=np.float32)[rng.integers(0, act_space.n, num)]
    return rng.uniform(act_space.low, act_space.high, (num,) + tuple(act_space.shape)).astype(np.float32)


class RandomAgent:
    """Uniform random actions with the agent's policy interface (for the random baseline)."""

    def __init__(self, act_space, seed: int):
        self.act_space, self.rng = act_space, np.random.default_rng(seed)

    def policy(self, obs, state, training):
        return random_actions(self.act_space, len(obs["reset"]), self.rng), None


def make_envs(config, num: int, seed: int, video: bool = False):
    """`num` environment worker processes for the config's task, seeded seed, seed+1, ...
    video: also render frames when the agent observes only the state (evaluation videos)."""
    from dreamer_tf import envs as envlib
    return envlib.make_config_batch(config, num, seed, **env_options(config, video))


def check_envs(config) -> None:
    """Raise ValueError (one line) if `make_envs` could not build the config's task (an unknown task
    or gym id, a bad option), without starting a worker; ids a gym_import module registers are only
    checked in the worker."""
    from dreamer_tf import envs as envlib
    envlib.check_config_env(config, **env_options(config))


def env_options(config, video: bool = False) -> dict:
    """The suite's options from the config for `dreamer_tf.envs.make`."""
    if config.task.startswith("atari_"):
        options = dict(repeat_action_probability=config.atari_sticky,
                       terminal_on_life_loss=config.atari_life_done, noops=config.atari_noops)
    elif config.task.startswith("dmc_"):
        options = dict(msaa=config.render_msaa)
    elif config.task.startswith("gym_"):
        options = dict(gym_import=config.gym_import or None)
    else:
        options = {}
    if video and config.observation == "state":
        options["video"] = True
    return options


def spaces(envs) -> tuple[dict, Any]:
    """(observation_space, action_space) of a batch of environments."""
    return envs.observation_space, envs.action_space


def obs_keys(obs_space: dict) -> list[str]:
    return [k for k in ("image", "state") if k in obs_space]


def evaluate(agent, env, episodes: int, seeds: EpisodeSeeds | None = None) -> tuple[list[float], list[dict]]:
    """Run `episodes` episodes with the evaluation policy (mode action); returns returns, episodes.
    seeds: the `eval` role's counters (advanced by the episodes finished), None: unseeded."""
    obs_space, act_space = spaces(env)
    collector = Collector(env, act_space, obs_keys(obs_space), seeds)
    finished: list[dict] = []
    collector.reset("eval")
    while len(finished) < episodes:  # the collector resets finished envs (and their policy state)
        action, collector.policy_state = agent.policy(collector.batch_obs(), collector.policy_state, False)
        finished.extend(collector.step(np.asarray(action), "eval"))
    finished = finished[:episodes]
    return [float(episode["reward"].sum()) for episode in finished], finished
