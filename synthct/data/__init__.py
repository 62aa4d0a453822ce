"""Data: phantoms, volume IO, manifests, preprocessing, datasets."""
