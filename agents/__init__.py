"""RL agents built on flare_jax: RAD-SAC (`agents.sac`) and Rainbow (`agents.rainbow`), and their
sides of the shared run loop (`agents.sac_train`, `agents.rainbow_train`).

    config, state = agents.load_run("runs/cartpole", seed=0)   # e.g. in a notebook
"""
from __future__ import annotations

from typing import Optional


def trainers() -> dict:
    """Agent name (as in a run's config.json) -> its `flare_jax.loop.Trainer` class."""
    from agents import rainbow_train, sac_train  # pylint: disable=g-import-not-at-top
    return {cls.name: cls for cls in (sac_train.SACTrainer, rainbow_train.RainbowTrainer)}


def load_run(run_dir: str, seed: Optional[int] = None, step: Optional[int] = None,
             with_trainer: bool = False):
    """(config, state) of a run directory's newest readable checkpoint (or `step`); with
    `with_trainer`, (config, state, trainer): the run's `flare_jax.loop.Trainer` (its replay
    layout, `learn`, `act`), e.g. to draw batches from the restored replay in a notebook.

    config: the run's TrainConfig / RainbowTrainConfig (from config.json); state: the
    `flare_jax.loop.Carry` of `seed`: agent and key, and the replay, stacks [D, E / D, T, ...]
    and actions of each of its D data shards (D = 1 unless the run's mesh had a data axis); of
    all seeds with a leading seed axis when seed is None. The directory is only read.
    """
    from flare_jax import loop  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    record = loop.read_config_json(run_dir)
    cls = trainers().get(record.get("agent"))
    if cls is None:
        raise ValueError(f"{run_dir}: unknown agent {record.get('agent')!r}; known: {sorted(trainers())}")
    if seed is not None and seed not in config_seeds(record):
        raise ValueError(f"seed {seed} is not in {run_dir}'s seeds {config_seeds(record)}")
    config, trainer, carry, _ = loop.load_state(cls, run_dir, step)
    if seed is not None:
        i = config.run.seeds.index(seed)
        carry = jax.tree.map(lambda x: x[i], carry)
    return (config, carry, trainer) if with_trainer else (config, carry)


def config_seeds(record: dict) -> list:
    """The seeds of a run's config.json record."""
    return list(record["config"]["run"]["seeds"])
