"""Evaluation: MGSM, X-AlpacaEval outputs, pairwise judging, plots."""
