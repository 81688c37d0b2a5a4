"""Evaluations beyond perplexity: recall (MQAR, passkey), lm-evaluation-harness, and ``attamba-eval``."""
