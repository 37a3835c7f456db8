"""Molecule generation: SELFIES generators, a molecular VAE, chemistry and MOSES metrics."""
