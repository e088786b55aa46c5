"""Noise and clipping mathematics: Gaussian noise (seeded or secure), clip factors, matrix
(correlated-noise) strategies, lazy noise for embedding rows."""
