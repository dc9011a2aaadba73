"""Environments: envpool DMC (pixels and states) and Atari, with the reference preprocessing."""
