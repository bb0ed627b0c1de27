"""Leaderboard tables built from the MLflow runs; installed as `robustbench_mat.leaderboard`."""
