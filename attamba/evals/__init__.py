"""Evaluations beyond training loss: recall (MQAR, passkey), ``attamba-eval`` on finished runs, loading a
run's checkpoint (:mod:`attamba.evals.runs`) and lm-evaluation-harness over our models
(:mod:`attamba.evals.harness`, needs the ``eval`` extra)."""
