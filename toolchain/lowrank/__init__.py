"""Low-rank error compensation: SVD branch (SVDQuant), QD-LoRA training, merging."""
