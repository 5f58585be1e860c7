"""Integrations of Rollout Routing Replay with training frameworks (optional dependencies).

- ``routereplay.integrations.trl``: ``R3GRPOTrainer``, TRL's ``GRPOTrainer`` with rollouts from the
  routereplay engine and their routing replayed in every policy log-prob forward (needs ``trl``).
"""
