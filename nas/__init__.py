"""Neural architecture search: search spaces, an LSTM controller trained with REINFORCE, random
search and regularized evolution, and child networks trained for real."""
