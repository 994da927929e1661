"""Synthetic data shared by the generators: drawing primitives, the file writer and the pretraining mix."""
