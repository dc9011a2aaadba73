"""RL agents built on flare_jax: RAD-SAC (`agents.sac`) and Rainbow (`agents.rainbow`)."""
